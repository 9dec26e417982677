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

// Session options for `params` (provider appended, threads set). `trt_cache_dir` is the bundle's
// trt_cache/ folder. Error when the provider is unknown or not in this ORT build.
Ort::SessionOptions make_session_options(const PolicyParams& params, const std::string& trt_cache_dir,
                                         bool trt_fp16);

}  // namespace detail
}  // namespace dpkit
