// The bundle's file rules beyond policy.json itself (defined in manifest.cpp, beside parse_manifest).
// dpkit.runtime.bundle applies the same rules with the same messages (docs/bundle-format.md).
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "internal.hpp"

namespace dpkit {
namespace detail {

// What a reader must know about an .onnx file, read from its protobuf without ONNX Runtime: declared
// inputs/outputs (name, ONNX element type, dims with -1 = dynamic) and every external-data `location`
// its tensors reference ("" for an external tensor without one).
struct OnnxInfo {
  using Io = std::tuple<std::string, int, std::vector<int64_t>>;
  std::vector<Io> inputs, outputs;  // inputs without initializers (old IR versions list them as inputs)
  std::set<std::string> external;
};

// Error "<path> is not a valid ONNX model (malformed protobuf)" / "<path> cannot be read".
OnnxInfo read_onnx_info(const std::string& path);

// The sha256 of every graph and external-data file against policy.json (load_manifest has already
// checked that they exist inside the bundle). Error naming the key, e.g. "models.denoiser.sha256 does
// not match denoiser.onnx (...)".
void verify_bundle_sha256(const Manifest& m, const std::string& bundle_dir);

}  // namespace detail
}  // namespace dpkit
