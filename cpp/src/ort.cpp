#include "ort.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include <onnxruntime_session_options_config_keys.h>

namespace dpkit {
namespace detail {
namespace {

std::mutex g_mutex;
// Never freed, and reachable from here: the library stays loaded for the process (closing loaded code
// and tearing ORT down during static destruction are both riskier than keeping them).
OrtRuntime* g_runtime = nullptr;
std::string g_version;

using GetApiBaseFn = const OrtApiBase* (*)();

// Where to look, in order: the caller's path, $DPKIT_ORT_LIBRARY, the system's loader search.
std::vector<std::string> candidates(const std::string& requested) {
  if (!requested.empty()) return {requested};
  if (const char* env = std::getenv("DPKIT_ORT_LIBRARY"); env && *env) return {env};
  return {"libonnxruntime.so.1", "libonnxruntime.so"};
}

}  // namespace

const OrtRuntime& ort_runtime(const std::string& requested) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_runtime) return *g_runtime;
  std::string tried;
  for (const std::string& path : candidates(requested)) {
    // RTLD_LOCAL: ORT's symbols must not clash with another ORT already in the process (Python's).
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      const char* why = dlerror();
      tried += "\n  " + path + ": " + (why ? why : "not found");
      continue;
    }
    auto get_base = reinterpret_cast<GetApiBaseFn>(dlsym(handle, "OrtGetApiBase"));
    if (!get_base) {
      tried += "\n  " + path + ": has no OrtGetApiBase (not an ONNX Runtime library)";
      continue;  // the handle stays open; harmless, and closing loaded code is riskier
    }
    const OrtApiBase* base = get_base();
    const OrtApi* api = base->GetApi(ORT_API_VERSION);
    const std::string version = base->GetVersionString();
    if (!api)
      throw Error("ONNX Runtime " + version + " at " + path + " does not offer API version " +
                  std::to_string(ORT_API_VERSION) + " that dpkit was built with; install a newer onnxruntime");
    Ort::InitApi(api);
    g_runtime = new OrtRuntime{path, version, new Ort::Env(ORT_LOGGING_LEVEL_WARNING, "dpkit")};
    g_version = version;
    return *g_runtime;
  }
  throw Error("cannot load the ONNX Runtime library (set PolicyParams::ort_library or DPKIT_ORT_LIBRARY to "
              "the path of libonnxruntime.so, e.g. the one inside the onnxruntime Python package's capi/ folder); tried:" + tried);
}

Ort::SessionOptions make_session_options(const PolicyParams& p, const TrtSettings& t) {
  Ort::SessionOptions opts;
  opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  opts.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);  // tiny graphs: parallel branches only add sync
  opts.SetIntraOpNumThreads(p.intra_op_threads);
  opts.SetInterOpNumThreads(1);
  opts.AddConfigEntry(kOrtSessionOptionsConfigAllowIntraOpSpinning, p.allow_spinning ? "1" : "0");
  if (p.provider == "cpu") return opts;

  static const std::pair<const char*, const char*> kProviders[] = {
      {"cuda", "CUDAExecutionProvider"}, {"tensorrt", "TensorrtExecutionProvider"}};
  const char* ort_name = nullptr;
  for (const auto& kv : kProviders)
    if (p.provider == kv.first) ort_name = kv.second;
  if (!ort_name) throw InputError("unknown provider \"" + p.provider + "\" (expected cpu, cuda or tensorrt)");

  const std::vector<std::string> available = Ort::GetAvailableProviders();
  auto has = [&](const char* name) { return std::find(available.begin(), available.end(), name) != available.end(); };
  if (!has(ort_name) || !has("CUDAExecutionProvider")) {
    std::string list;
    for (const auto& a : available) list += (list.empty() ? "" : ", ") + a;
    throw Error("provider \"" + p.provider + "\" is not available in ONNX Runtime " + ort_runtime("").version + " at " +
                ort_runtime("").library + " (it has: " + list + "); install onnxruntime-gpu (pip install 'dpkit[gpu]')");
  }
  const std::string device = std::to_string(p.device_id);
  const OrtApi& api = Ort::GetApi();

  if (p.provider == "tensorrt") {
    OrtTensorRTProviderOptionsV2* raw = nullptr;
    Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&raw));
    std::unique_ptr<OrtTensorRTProviderOptionsV2, void (*)(OrtTensorRTProviderOptionsV2*)> trt(
        raw, [](OrtTensorRTProviderOptionsV2* o) { Ort::GetApi().ReleaseTensorRTProviderOptions(o); });
    // Engines are built once by `dpkit-export --tensorrt` (or on first load) and reused from the cache
    // only when every option that keys them (precision, profile shapes) is the exporter's.
    const char* keys[] = {"device_id", "trt_engine_cache_enable", "trt_engine_cache_path", "trt_fp16_enable",
                          "trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"};
    const char* vals[] = {device.c_str(), "1", t.cache_dir.c_str(), t.fp16 ? "1" : "0",
                          t.min_shapes.c_str(), t.opt_shapes.c_str(), t.max_shapes.c_str()};
    Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(trt.get(), keys, vals, 7));
    opts.AppendExecutionProvider_TensorRT_V2(*trt);
  }
  // CUDA also backs TensorRT for the nodes TensorRT does not take.
  OrtCUDAProviderOptionsV2* raw = nullptr;
  Ort::ThrowOnError(api.CreateCUDAProviderOptions(&raw));
  std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> cuda(
      raw, [](OrtCUDAProviderOptionsV2* o) { Ort::GetApi().ReleaseCUDAProviderOptions(o); });
  const char* keys[] = {"device_id"};
  const char* vals[] = {device.c_str()};
  Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda.get(), keys, vals, 1));
  opts.AppendExecutionProvider_CUDA_V2(*cuda);
  return opts;
}

}  // namespace detail

std::string ort_version() {
  std::lock_guard<std::mutex> lock(detail::g_mutex);
  return detail::g_version;
}

}  // namespace dpkit
