// The bundle's file rules beyond policy.json itself (defined in manifest.cpp, beside parse_manifest), and the
// reader's entry points for the pybind module (dpkit.runtime.bundle is a typed view over read_bundle).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
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
  std::map<std::string, int64_t> op_types;  // node op type -> count (subgraphs and functions too)
  std::map<int, int64_t> tensor_types;      // tensor data_type -> count (every tensor walked)
};

// (precision, evidence) of a graph from its nodes and tensors (docs/bundle-format.md, "Precision"):
// "int8" with integer quantization nodes (DynamicQuantizeLinear, MatMulInteger, QLinear*, ...) or int8/uint8
// tensors, else "fp16" with float16 tensors, else "fp32". The evidence completes "<file> is <precision> (...)".
std::pair<std::string, std::string> graph_precision(const OnnxInfo& info);
// Whether a graph that is `derived` may be labelled `declared`: only its own
// precision, except that an fp32 graph with no MatMul/Gemm/Conv/ConvTranspose node (nothing --fp16
// converts, e.g. the low-dim encoder) may be labelled fp16.
bool precision_fits(const std::string& declared, const std::string& derived, const OnnxInfo& info);

// Error "<path> is not a valid ONNX model (malformed protobuf)" / "<path> cannot be read".
OnnxInfo read_onnx_info(const std::string& path);

// The sha256 of every graph and external-data file against policy.json (load_manifest has already
// checked that they exist inside the bundle). Error naming the key, e.g. "models.denoiser.sha256 does
// not match denoiser.onnx (...)". `digest` computes a file's hex sha256: sha256_file_hex, or one the caller
// has that is faster (the pybind module passes Python's hashlib-based dpkit.io.sha256_file).
using Digest = std::function<std::string(const std::string& path)>;
void verify_bundle_sha256(const Manifest& m, const std::string& bundle_dir, const Digest& digest = sha256_file_hex);

// The whole reader without ONNX Runtime: policy.json read once and checked by every manifest rule, then
// (check_files) the file rules of load_manifest, then (and verify_sha256) every sha256. `json` is the
// document that was checked, as compact JSON in the file's key order: what Python builds its view from.
struct BundleRead {
  Manifest manifest;
  std::string json;
};
BundleRead read_bundle(const std::string& bundle_dir, bool check_files, bool verify_sha256,
                       const Digest& digest = sha256_file_hex);

// The reader's size limits (docs/bundle-format.md, "Limits") by name, e.g. {"max_trt_batch", 65536}.
std::vector<std::pair<std::string, int64_t>> bundle_limits();

}  // namespace detail
}  // namespace dpkit
