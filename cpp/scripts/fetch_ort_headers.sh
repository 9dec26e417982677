#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers into third_party/onnxruntime/ (gitignored).
#
#   cpp/scripts/fetch_ort_headers.sh            # from the repo root
#
# Why this way: the PyPI `onnxruntime` wheel ships libonnxruntime.so but no headers, and Debian 12 has no
# ONNX Runtime package. Debian trixie's `libonnxruntime-dev` .deb is just the headers (~85 KB), so we
# download it with a private apt configuration that points the configured Debian mirror at trixie (the
# system's sources stay untouched) and unpack it with dpkg-deb. The library itself is loaded at run time
# (dlopen), so older headers work with a newer library.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/third_party/onnxruntime"
if [[ -f "$dest/include/onnxruntime_cxx_api.h" ]]; then
  echo "ONNX Runtime headers already in $dest/include"
  exit 0
fi

mirror="${DPKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/etc/preferences.d" "$work/etc/sources.list.d"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
      -o "Dir::Etc::Preferences=$work/etc/preferences" -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
      -o "APT::Architecture=amd64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
(cd "$work" && apt-get "${opts[@]}" -qq download libonnxruntime-dev)
deb="$(ls "$work"/libonnxruntime-dev_*.deb)"
dpkg-deb -x "$deb" "$work/x"
hdr="$(dirname "$(find "$work/x" -name onnxruntime_cxx_api.h | head -1)")"
[[ -n "$hdr" && -f "$hdr/onnxruntime_c_api.h" ]] || { echo "error: no ONNX Runtime headers in $deb" >&2; exit 1; }
mkdir -p "$dest/include"
cp "$hdr"/*.h "$dest/include/"
echo "$(basename "$deb")" > "$dest/SOURCE"
echo "ONNX Runtime headers from $(basename "$deb") -> $dest/include"
