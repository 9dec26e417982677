// ONNX Runtime, loaded at run time: the build needs only headers, and one binary works with whichever
// libonnxruntime (1.21 API or newer) the machine has. Internal; includes ORT headers.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <string>

#include "dpkit/runtime.hpp"

namespace dpkit {
namespace detail {

struct OrtRuntime {
  std::string library;  // path it was loaded from
  std::string version;
  Ort::Env* env;        // process-wide, never destroyed (ORT dislikes being torn down at exit)
};

// Load the library (first call only; later calls return the same runtime) and initialize the C++ API.
const OrtRuntime& ort_runtime(const std::string& requested_library);

// What the TensorRT provider needs to reuse the engines dpkit-export cached: the same cache folder,
// precision and optimization profile ("name:1x2x20,..." for min/opt/max) the exporter used
// (dpkit.runtime.bundle.ort_trt_options). Ignored for the other providers.
struct TrtSettings {
  std::string cache_dir;
  bool fp16 = false;
  std::string min_shapes, opt_shapes, max_shapes;
};

// Session options for `params` (provider appended, threads set). Error when the provider is unknown
// or not in this ORT build.
Ort::SessionOptions make_session_options(const PolicyParams& params, const TrtSettings& trt);

}  // namespace detail
}  // namespace dpkit
