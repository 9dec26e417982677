// dpkit::Policy: bundle -> two ORT sessions + buffers sized for max_batch -> the K-step reverse loop.
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>
#include <random>

#include "internal.hpp"
#include "manifest.hpp"
#include "ort.hpp"

namespace dpkit {

using detail::Manifest;
using detail::StepCoefficients;

namespace {

template <class Dims>
std::string shape_str(const Dims& dims) {
  std::string s = "(";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + (dims[i] < 0 ? std::string("B") : std::to_string(dims[i]));
  return s + ")";
}

// NaN and Inf are the floats whose exponent bits are all ones. An integer OR-reduction over that test
// vectorizes without -ffast-math (a float sum would not); the slow search runs only on failure.
bool all_finite(const float* p, std::size_t n) {
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    bad |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

std::size_t first_non_finite(const float* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return i;
  return n;
}

// "name:BxD1xD2,..." for ORT's TensorRT profile options, batch first (dpkit.runtime.bundle.ort_trt_options).
std::string profile_shapes(const std::vector<std::pair<std::string, std::vector<int64_t>>>& inputs, int batch) {
  std::string s;
  for (const auto& [name, dims] : inputs) {
    s += (s.empty() ? "" : ",") + name + ":" + std::to_string(batch);
    for (int64_t d : dims) s += "x" + std::to_string(d);
  }
  return s;
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 5) bytes /= 1024.0, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", bytes, units[u]);
  return buf;
}

// Each loaded Policy gets its own id, so a Sampler handle knows which Policy made it (an address could
// be reused by a later Policy).
std::atomic<std::uint64_t> g_next_policy_id{1};

// The graph's declared inputs/outputs must be the contract's: same names, element types and fixed sizes
// (a -1 in `want` is the dynamic batch; a dynamic dim in the graph accepts anything).
void check_io(const Ort::Session& s, bool input, std::size_t i, const std::string& file, const std::string& name,
              ONNXTensorElementDataType type, const std::vector<int64_t>& want) {
  Ort::AllocatorWithDefaultOptions alloc;
  const std::string kind = input ? "input" : "output";
  const std::string got = (input ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc)).get();
  if (got != name)
    throw Error(file + ": " + kind + " " + std::to_string(i) + " is named '" + got + "', expected '" + name + "'");
  Ort::TypeInfo ti = input ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);
  if (ti.GetONNXType() != ONNX_TYPE_TENSOR) throw Error(file + ": " + kind + " '" + name + "' is not a tensor");
  auto t = ti.GetTensorTypeAndShapeInfo();
  if (t.GetElementType() != type)
    throw Error(file + ": " + kind + " '" + name + "' has the wrong element type (expected " +
                (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? "int64" : "float32") + ")");
  const std::vector<int64_t> dims = t.GetShape();
  bool ok = dims.size() == want.size();
  for (std::size_t d = 0; ok && d < dims.size(); ++d) ok = dims[d] < 0 || want[d] < 0 || dims[d] == want[d];
  if (!ok) throw Error(file + ": " + kind + " '" + name + "' has shape " + shape_str(dims) + ", expected " + shape_str(want));
}

}  // namespace

std::size_t PolicyInfo::observation_size(std::size_t i, int batch) const {
  if (i >= observations.size())
    throw InputError("observation index " + std::to_string(i) + " is out of range (the bundle has " +
                     std::to_string(observations.size()) + ")");
  return static_cast<std::size_t>(batch) * n_obs_steps * observations[i].step_size;
}
std::size_t PolicyInfo::trajectory_size(int batch) const { return static_cast<std::size_t>(batch) * horizon * action_dim; }
std::size_t PolicyInfo::actions_size(int batch) const { return static_cast<std::size_t>(batch) * n_action_steps * action_dim; }
std::size_t PolicyInfo::step_noise_size(const Sampler& sampler, int batch) const {
  if (!sampler) throw InputError("step_noise_size: the Sampler is empty (use Policy::find_sampler)");
  return static_cast<std::size_t>(sampler.num_inference_steps()) * trajectory_size(batch);
}

// ---- the loaded policy ---------------------------------------------------------------------------------
//
// Data path of one `sample` call. Every tensor below is a view of a buffer made at load, bound once per
// batch size in an Ort::IoBinding, so a call only fills buffers and runs the bindings:
//   observations (host) --encoder--> cond --denoiser x K--> noise_pred (host) --apply_step--> sample (host)
// With "cpu", cond is a host buffer. With "cuda" and "tensorrt", cond is device memory from ONNX Runtime's
// CUDA allocator: the encoder writes it there and all K denoiser runs read it there, so the condition
// (the largest per-step input: To x features) never crosses the bus. The sample (B x H x A floats) and
// timestep stay on the host, because the reverse-step arithmetic (detail::apply_step) runs on the CPU
// and dpkit ships no CUDA kernels; ONNX Runtime copies them in (and noise_pred out) inside each run.
// The device path compiles against the ORT C++ API only (no CUDA headers) and has NOT been run on the
// machines this was written on (no GPU there); the CPU path, which shares every line but the cond buffer,
// is what the tests run.
struct Policy::Impl {
  std::uint64_t id = 0;  // see g_next_policy_id
  PolicyInfo info;
  Manifest m;
  std::vector<std::vector<StepCoefficients>> steps;  // per sampler, in info.samplers order

  // Host buffers for max_batch; the tensors in OrtState are views of them.
  std::vector<std::vector<float>> obs;
  std::vector<float> cond, x, eps, noise;  // `cond` stays empty when it lives on the device
  // Inpainting: the initial sample (its noise re-noises the prefix), the prefix and its weights.
  std::vector<float> x_init, prefix, prefix_weights;
  std::vector<int64_t> timestep;

  // Every ORT object lives here, created only once the library is loaded: even a null Ort:: handle
  // calls into the API when destroyed, so none may exist before (e.g. when policy.json is bad).
  // Member order is destruction order reversed: bindings, then device memory, then its allocator, then
  // the sessions.
  struct Bindings {
    Ort::IoBinding encoder{nullptr}, denoiser{nullptr};
  };
  struct OrtState {
    Ort::Session encoder{nullptr}, denoiser{nullptr};
    Ort::RunOptions run_options;
    Ort::Allocator device_allocator{nullptr};                 // cuda / tensorrt only
    std::unique_ptr<Ort::MemoryAllocation> device_cond;      // (max_batch, C) floats on the GPU
    std::vector<Bindings> bindings;  // for each batch size b (index b - 1), made once at load
  };
  std::unique_ptr<OrtState> ort;

  std::mt19937_64 rng;
  std::normal_distribution<float> normal;
  SampleTiming timing;

  // Loading, step by step.
  void load(const std::string& dir, const PolicyParams& p);
  static void validate_params(const PolicyParams& p);
  void check_buffer_budget(const PolicyParams& p) const;
  void check_model_files(const std::string& dir, const PolicyParams& p) const;
  void make_sessions(const std::string& dir, const PolicyParams& p, const detail::OrtRuntime& rt);
  void check_graph_io(const std::string& dir) const;
  void fill_info(const std::string& dir, const PolicyParams& p, const detail::OrtRuntime& rt);
  void allocate_buffers(const PolicyParams& p);
  void bind_buffers(const PolicyParams& p);
  void warm_up(const std::string& dir);

  // Sampling, step by step (Policy::sample).
  std::size_t check_request(const SampleRequest& req, const SampleOutput& out, detail::Inpaint& inpaint) const;
  void check_inputs(const SampleRequest& req, int64_t K) const;
  void check_prefix(const SampleRequest& req, detail::Inpaint& inpaint) const;
  void copy_in(const SampleRequest& req, detail::Inpaint& inpaint);
  // `inpaint.rows` 0: no prefix; else it points into `prefix` / `prefix_weights`.
  void run(int batch, std::size_t sampler, const float* initial_noise, const float* step_noise,
           const detail::Inpaint& inpaint);
  void copy_out(int batch, SampleOutput& out) const;
  void draw(float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = normal(rng);
  }
  bool on_device() const { return info.provider != "cpu"; }
};

void Policy::Impl::load(const std::string& dir, const PolicyParams& p) {
  validate_params(p);
  m = detail::load_manifest(dir);
  check_buffer_budget(p);  // before anything large is allocated or loaded
  check_model_files(dir, p);
  const detail::OrtRuntime& rt = detail::ort_runtime(p.ort_library);
  make_sessions(dir, p, rt);
  check_graph_io(dir);
  fill_info(dir, p, rt);
  allocate_buffers(p);
  bind_buffers(p);
  warm_up(dir);
  rng.seed(p.seed);
  id = g_next_policy_id.fetch_add(1);
}

void Policy::Impl::validate_params(const PolicyParams& p) {
  if (p.max_batch < 1) throw InputError("PolicyParams::max_batch must be >= 1, got " + std::to_string(p.max_batch));
  if (p.intra_op_threads < 0) throw InputError("PolicyParams::intra_op_threads must be >= 0");
  if (p.device_id < 0) throw InputError("PolicyParams::device_id must be >= 0, got " + std::to_string(p.device_id));
}

// Refuse an absurd max_batch from the sizes alone (double arithmetic: no overflow for any int).
void Policy::Impl::check_buffer_budget(const PolicyParams& p) const {
  // cond, x, eps, noise, x_init, prefix (the prefix weights are per row, not per item)
  double floats = static_cast<double>(m.cond_dim) + 5.0 * m.horizon * m.action_dim;
  for (const auto& o : m.observations) floats += static_cast<double>(m.n_obs_steps) * static_cast<double>(o.step_size);
  const double per_item = floats * sizeof(float) + sizeof(int64_t);  // + timestep
  const double bytes = per_item * p.max_batch;
  if (bytes > static_cast<double>(kMaxBufferBytes))
    throw InputError("PolicyParams::max_batch = " + std::to_string(p.max_batch) + " needs " + human_bytes(bytes) +
                     " (" + std::to_string(static_cast<unsigned long long>(per_item)) + " bytes per batch item) of "
                     "preallocated buffers for this bundle; the limit is " + human_bytes(double(kMaxBufferBytes)));
  if (p.max_batch > kMaxBatchLimit)
    throw InputError("PolicyParams::max_batch = " + std::to_string(p.max_batch) + " exceeds the limit of " +
                     std::to_string(kMaxBatchLimit));
}

// load_manifest has checked that every graph and external-data file exists inside the bundle and that
// the graphs' declared inputs/outputs are the contract's; here their bytes are checked against policy.json.
void Policy::Impl::check_model_files(const std::string& dir, const PolicyParams& p) const {
  if (p.verify_sha256) detail::verify_bundle_sha256(m, dir);
}

void Policy::Impl::make_sessions(const std::string& dir, const PolicyParams& p, const detail::OrtRuntime& rt) {
  const std::string enc_path = dir + "/" + m.encoder.file, den_path = dir + "/" + m.denoiser.file;
  ort = std::make_unique<OrtState>();
  PolicyParams enc_params = p;
  enc_params.allow_spinning = false;  // runs once per chunk; spinning would steal cores from the denoiser
  // TensorRT: sessions use the manifest's profile (tensorrt.min/opt/max_batch, precision; written once by
  // dpkit-export), so they reuse the exporter's engines, or build them at the first load into the same
  // cache folder with the same profile (dpkit.runtime.bundle.ort_trt_options). A manifest without a
  // `tensorrt` entry gets no profile: ORT builds an engine per input shape it meets.
  detail::TrtSettings enc_trt, den_trt;
  if (p.provider == "tensorrt") {
    if (m.has_tensorrt && p.max_batch > m.tensorrt_max_batch)
      throw InputError("PolicyParams::max_batch = " + std::to_string(p.max_batch) + " exceeds the batch range " +
                       std::to_string(m.tensorrt_min_batch) + ".." + std::to_string(m.tensorrt_max_batch) +
                       " of the bundle's TensorRT profile (re-export with dpkit-export --max-batch " +
                       std::to_string(p.max_batch) + ")");
    std::vector<std::pair<std::string, std::vector<int64_t>>> enc_in, den_in = {
        {"sample", {m.horizon, m.action_dim}}, {"timestep", {}}, {"cond", {m.cond_dim}}};
    for (const auto& o : m.observations) {
      std::vector<int64_t> dims = {m.n_obs_steps};
      dims.insert(dims.end(), o.shape.begin(), o.shape.end());
      enc_in.emplace_back(o.name, dims);
    }
    for (auto [t, in] : {std::pair{&enc_trt, &enc_in}, std::pair{&den_trt, &den_in}}) {
      t->cache_dir = dir + "/" + m.tensorrt_cache_dir;
      t->fp16 = m.tensorrt_precision == "fp16";
      if (m.has_tensorrt) {
        t->min_shapes = profile_shapes(*in, m.tensorrt_min_batch);
        t->opt_shapes = profile_shapes(*in, m.tensorrt_opt_batch);
        t->max_shapes = profile_shapes(*in, m.tensorrt_max_batch);
      }
    }
  }
  try {
    Ort::SessionOptions enc_opts = detail::make_session_options(enc_params, enc_trt);
    Ort::SessionOptions den_opts = detail::make_session_options(p, den_trt);
    ort->encoder = Ort::Session(*rt.env, enc_path.c_str(), enc_opts);
    ort->denoiser = Ort::Session(*rt.env, den_path.c_str(), den_opts);
  } catch (const Ort::Exception& e) {
    throw Error("ONNX Runtime could not load the bundle " + dir + ": " + e.what());
  }
}

void Policy::Impl::check_graph_io(const std::string& dir) const {
  const std::string enc_path = dir + "/" + m.encoder.file, den_path = dir + "/" + m.denoiser.file;
  const Ort::Session& encoder = ort->encoder;
  const Ort::Session& denoiser = ort->denoiser;
  const int To = m.n_obs_steps, H = m.horizon, A = m.action_dim, C = m.cond_dim;
  const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, I64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (encoder.GetInputCount() != m.observations.size() || encoder.GetOutputCount() != 1)
    throw Error(enc_path + ": has " + std::to_string(encoder.GetInputCount()) + " inputs and " +
                std::to_string(encoder.GetOutputCount()) + " outputs, expected " + std::to_string(m.observations.size()) +
                " and 1 (policy.json observations)");
  for (std::size_t i = 0; i < m.observations.size(); ++i) {
    std::vector<int64_t> want = {-1, To};
    want.insert(want.end(), m.observations[i].shape.begin(), m.observations[i].shape.end());
    check_io(encoder, true, i, enc_path, m.observations[i].name, F, want);
  }
  check_io(encoder, false, 0, enc_path, "cond", F, {-1, C});
  if (denoiser.GetInputCount() != 3 || denoiser.GetOutputCount() != 1)
    throw Error(den_path + ": expected 3 inputs (sample, timestep, cond) and 1 output (noise_pred)");
  check_io(denoiser, true, 0, den_path, "sample", F, {-1, H, A});
  check_io(denoiser, true, 1, den_path, "timestep", I64, {-1});
  check_io(denoiser, true, 2, den_path, "cond", F, {-1, C});
  check_io(denoiser, false, 0, den_path, "noise_pred", F, {-1, H, A});
}

void Policy::Impl::fill_info(const std::string& dir, const PolicyParams& p, const detail::OrtRuntime& rt) {
  info.bundle_dir = dir;
  info.obs_mode = m.obs_mode;
  info.n_obs_steps = m.n_obs_steps;
  info.horizon = m.horizon;
  info.n_action_steps = m.n_action_steps;
  info.action_dim = m.action_dim;
  info.first_action_index = m.first_action_index;
  info.cond_dim = m.cond_dim;
  info.max_batch = p.max_batch;
  info.observations = m.observations;
  info.action_scale = m.action_scale;
  info.action_offset = m.action_offset;
  for (const auto& s : m.samplers) {
    steps.push_back(detail::make_steps(m, s));
    const bool noisy = std::any_of(steps.back().begin(), steps.back().end(), [](const StepCoefficients& c) { return c.sigma > 0.0f; });
    info.samplers.push_back({s.name, s.sampler, s.num_inference_steps, noisy});
  }
  info.default_sampler = m.samplers[static_cast<std::size_t>(m.default_sampler)].name;
  info.precision = m.denoiser.precision;
  info.provider = p.provider;
  info.ort_version = rt.version;
  info.ort_library = rt.library;
}

void Policy::Impl::allocate_buffers(const PolicyParams& p) {
  const std::size_t B = static_cast<std::size_t>(p.max_batch);
  for (std::size_t i = 0; i < m.observations.size(); ++i) obs.emplace_back(info.observation_size(i, p.max_batch), 0.0f);
  if (!on_device()) cond.assign(B * static_cast<std::size_t>(m.cond_dim), 0.0f);
  x.assign(info.trajectory_size(p.max_batch), 0.0f);
  eps.assign(x.size(), 0.0f);
  noise.assign(x.size(), 0.0f);
  x_init.assign(x.size(), 0.0f);
  prefix.assign(x.size(), 0.0f);
  prefix_weights.assign(static_cast<std::size_t>(m.horizon), 0.0f);
  timestep.assign(B, 0);
}

// One encoder and one denoiser binding per batch size, each bound to views of the buffers: a call then
// runs a ready binding (no tensor creation, no name lookup).
void Policy::Impl::bind_buffers(const PolicyParams& p) {
  const Ort::MemoryInfo host = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::MemoryInfo cond_mem{nullptr};
  float* cond_data = cond.data();
  const std::size_t C = static_cast<std::size_t>(m.cond_dim);
  if (on_device()) {
    // "Cuda" is ORT's name for CUDA device memory (onnxruntime_c_api.h); the session's CUDA provider owns
    // the allocator, so the memory is where both sessions' CUDA kernels expect it.
    cond_mem = Ort::MemoryInfo("Cuda", OrtDeviceAllocator, p.device_id, OrtMemTypeDefault);
    ort->device_allocator = Ort::Allocator(ort->denoiser, cond_mem);
    ort->device_cond = std::make_unique<Ort::MemoryAllocation>(
        ort->device_allocator.GetAllocation(static_cast<std::size_t>(p.max_batch) * C * sizeof(float)));
    cond_data = static_cast<float*>(ort->device_cond->get());
  }
  const OrtMemoryInfo* cond_info = on_device() ? static_cast<const OrtMemoryInfo*>(cond_mem)
                                                : static_cast<const OrtMemoryInfo*>(host);
  const int64_t To = m.n_obs_steps, H = m.horizon, A = m.action_dim;
  ort->bindings.reserve(static_cast<std::size_t>(p.max_batch));
  for (int b = 1; b <= p.max_batch; ++b) {
    Bindings bb{Ort::IoBinding(ort->encoder), Ort::IoBinding(ort->denoiser)};
    for (std::size_t i = 0; i < obs.size(); ++i) {
      std::vector<int64_t> dims = {b, To};
      dims.insert(dims.end(), m.observations[i].shape.begin(), m.observations[i].shape.end());
      bb.encoder.BindInput(m.observations[i].name.c_str(), Ort::Value::CreateTensor<float>(
          host, obs[i].data(), info.observation_size(i, b), dims.data(), dims.size()));
    }
    const int64_t cdims[2] = {b, static_cast<int64_t>(C)}, xdims[3] = {b, H, A}, tdims[1] = {b};
    const std::size_t n = info.trajectory_size(b);
    const Ort::Value cond_view = Ort::Value::CreateTensor<float>(cond_info, cond_data, static_cast<std::size_t>(b) * C, cdims, 2);
    bb.encoder.BindOutput("cond", cond_view);
    bb.denoiser.BindInput("sample", Ort::Value::CreateTensor<float>(host, x.data(), n, xdims, 3));
    bb.denoiser.BindInput("timestep", Ort::Value::CreateTensor<int64_t>(host, timestep.data(), static_cast<std::size_t>(b), tdims, 1));
    bb.denoiser.BindInput("cond", cond_view);
    bb.denoiser.BindOutput("noise_pred", Ort::Value::CreateTensor<float>(host, eps.data(), n, xdims, 3));
    ort->bindings.push_back(std::move(bb));
  }
}

// ORT allocates its arenas and plans on the first run of each shape; do it here, not in the caller's
// first control cycle. Noise is zero so no generator draws are consumed.
void Policy::Impl::warm_up(const std::string& dir) {
  for (int b : {1, info.max_batch}) {
    Bindings& bb = ort->bindings[static_cast<std::size_t>(b - 1)];
    try {
      ort->encoder.Run(ort->run_options, bb.encoder);
      bb.encoder.SynchronizeOutputs();
      ort->denoiser.Run(ort->run_options, bb.denoiser);
      bb.denoiser.SynchronizeOutputs();
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime failed on a warm-up run of " + dir + " at batch " + std::to_string(b) + ": " + e.what());
    }
  }
}

// ---- sampling, step by step (Policy::sample) -------------------------------------------------------------
// check_request (every check, before anything is copied), copy_in, run (encoder, then the reverse loop),
// copy_out. Checks build their message (and allocate) only on failure: the success path allocates nothing.

namespace {

template <class What, class Dims>
void expect_size(std::size_t got, std::size_t want, const What& what, const Dims& dims) {
  if (got != want)
    throw InputError(std::string(what) + ": expected shape " + shape_str(dims) + " = " + std::to_string(want) +
                     " floats, got " + std::to_string(got));
}

}  // namespace

// The call itself (batch, sampler, outputs named), then the inputs, the prefix and the outputs, in that
// order. Returns the sampler's index; fills the prefix's rows in `inpaint`.
std::size_t Policy::Impl::check_request(const SampleRequest& req, const SampleOutput& out,
                                        detail::Inpaint& inpaint) const {
  const int B = req.batch;
  if (B < 1 || B > info.max_batch)
    throw InputError("batch " + std::to_string(B) + " is outside [1, max_batch = " + std::to_string(info.max_batch) +
                     "] (raise PolicyParams::max_batch)");
  if (!req.sampler)
    throw InputError("SampleRequest::sampler is empty (set it from Policy::find_sampler or Policy::default_sampler)");
  if (req.sampler.owner_ != id)
    throw InputError("SampleRequest::sampler " + req.sampler.name() + " was made by another Policy (use this "
                     "Policy's find_sampler)");
  if (!out.trajectory.data && !out.actions.data)
    throw InputError("SampleOutput has no outputs: set trajectory, actions or both");
  const std::size_t sampler = static_cast<std::size_t>(req.sampler.index_);
  check_inputs(req, info.samplers[sampler].num_inference_steps);
  check_prefix(req, inpaint);
  const int64_t b = B, H = info.horizon, A = info.action_dim, Ta = info.n_action_steps;
  if (out.trajectory.data) expect_size(out.trajectory.size, info.trajectory_size(B), "output trajectory", std::array<int64_t, 3>{b, H, A});
  if (out.actions.data) expect_size(out.actions.size, info.actions_size(B), "output actions", std::array<int64_t, 3>{b, Ta, A});
  return sampler;
}

// Observations (count, shapes, finite) and injected noise (shapes, finite) for K steps.
void Policy::Impl::check_inputs(const SampleRequest& req, int64_t K) const {
  const int B = req.batch;
  if (req.observations.size() != info.observations.size())
    throw InputError("expected " + std::to_string(info.observations.size()) + " observation arrays (" +
                     info.observations[0].name + (info.observations.size() > 1 ? ", ..." : "") + "), got " +
                     std::to_string(req.observations.size()));
  const int64_t b = B, To = info.n_obs_steps, H = info.horizon, A = info.action_dim;
  for (std::size_t i = 0; i < info.observations.size(); ++i) {
    const ObservationInfo& o = info.observations[i];
    const ConstFloatSpan& s = req.observations[i];
    const std::size_t on = info.observation_size(i, B);
    if ((s.data ? s.size : 0) != on) {
      std::vector<int64_t> dims = {b, To};
      dims.insert(dims.end(), o.shape.begin(), o.shape.end());
      expect_size(s.data ? s.size : 0, on, "observation '" + o.name + "'", dims);
    }
    if (!all_finite(s.data, on)) {
      const std::size_t at = first_non_finite(s.data, on);
      throw InputError("observation '" + o.name + "' holds " + (std::isnan(s.data[at]) ? "NaN" : "Inf") +
                       " at flat index " + std::to_string(at) + " (batch item " + std::to_string(at / (on / B)) + ")");
    }
  }
  const std::size_t n = info.trajectory_size(B);
  if (req.initial_noise.data) {
    expect_size(req.initial_noise.size, n, "initial_noise", std::array<int64_t, 3>{b, H, A});
    if (!all_finite(req.initial_noise.data, n)) throw InputError("initial_noise holds NaN or Inf");
  }
  if (req.step_noise.data) {
    expect_size(req.step_noise.size, static_cast<std::size_t>(K) * n, "step_noise", std::array<int64_t, 4>{K, b, H, A});
    if (!all_finite(req.step_noise.data, req.step_noise.size)) throw InputError("step_noise holds NaN or Inf");
  }
}

// The inpainting prefix (rows, start, finite values, weights in [0, 1]); sets inpaint.start / rows.
void Policy::Impl::check_prefix(const SampleRequest& req, detail::Inpaint& inpaint) const {
  if (!req.prefix.data) {
    if (req.prefix_rows != 0 || req.prefix_weights.data)
      throw InputError("SampleRequest::prefix_rows / prefix_weights given without a prefix");
    return;
  }
  const int B = req.batch, A = info.action_dim;
  const int P = req.prefix_rows, start = req.prefix_start == -1 ? info.first_action_index : req.prefix_start;
  if (P < 1 || start < 0 || P > info.horizon - start)
    throw InputError("prefix of " + std::to_string(P) + " rows starting at " + std::to_string(start) +
                     " does not fit the horizon " + std::to_string(info.horizon) + " (need 1 <= rows <= horizon - start)");
  const std::size_t pn = static_cast<std::size_t>(B) * P * A;
  expect_size(req.prefix.size, pn, "prefix", std::array<int64_t, 3>{B, P, A});
  if (!all_finite(req.prefix.data, pn)) throw InputError("prefix contains NaN or Inf");
  if (req.prefix_weights.data) {
    if (req.prefix_weights.size != static_cast<std::size_t>(P))
      throw InputError("prefix weights must be " + std::to_string(P) + " values in [0, 1], got " +
                       std::to_string(req.prefix_weights.size));
    for (int j = 0; j < P; ++j)
      if (!(req.prefix_weights.data[j] >= 0.0f && req.prefix_weights.data[j] <= 1.0f))  // NaN fails too
        throw InputError("prefix weights must be " + std::to_string(P) + " values in [0, 1], got " +
                         std::to_string(req.prefix_weights.data[j]) + " at " + std::to_string(j));
  }
  inpaint.start = start;
  inpaint.rows = P;
}

// The checked inputs into the buffers the bindings read (the prefix and its weights, default 1, too).
void Policy::Impl::copy_in(const SampleRequest& req, detail::Inpaint& inpaint) {
  const int B = req.batch;
  for (std::size_t i = 0; i < info.observations.size(); ++i)
    std::memcpy(obs[i].data(), req.observations[i].data, info.observation_size(i, B) * sizeof(float));
  if (inpaint.rows == 0) return;
  std::memcpy(prefix.data(), req.prefix.data, static_cast<std::size_t>(B) * inpaint.rows * info.action_dim * sizeof(float));
  if (req.prefix_weights.data)
    std::memcpy(prefix_weights.data(), req.prefix_weights.data, inpaint.rows * sizeof(float));
  else
    std::fill(prefix_weights.begin(), prefix_weights.begin() + inpaint.rows, 1.0f);
  inpaint.prefix = prefix.data();
  inpaint.weights = prefix_weights.data();
}

// The sample into `out`: the normalized trajectory, and/or the executed actions unnormalized.
void Policy::Impl::copy_out(int B, SampleOutput& out) const {
  const int H = info.horizon, A = info.action_dim;
  if (out.trajectory.data) std::memcpy(out.trajectory.data, x.data(), info.trajectory_size(B) * sizeof(float));
  if (!out.actions.data) return;
  const float* scale = m.action_scale.data();
  const float* offset = m.action_offset.data();
  float* dst = out.actions.data;
  for (int bi = 0; bi < B; ++bi) {
    const float* src = x.data() + (static_cast<std::size_t>(bi) * H + info.first_action_index) * A;
    for (int j = 0; j < info.n_action_steps * A; ++j) *dst++ = src[j] * scale[j % A] + offset[j % A];
  }
}

// The hot path: no allocation, no tensor creation, no name lookups.
void Policy::Impl::run(int batch, std::size_t sampler, const float* initial_noise, const float* step_noise,
                       const detail::Inpaint& inpaint) {
  Bindings& bb = ort->bindings[static_cast<std::size_t>(batch - 1)];
  Ort::Session& encoder = ort->encoder;
  Ort::Session& denoiser = ort->denoiser;
  const Ort::RunOptions& run_options = ort->run_options;
  const std::size_t n = info.trajectory_size(batch);
  const bool clip = m.clip_sample;
  const float r = static_cast<float>(m.clip_sample_range);
  using Clock = std::chrono::steady_clock;
  Clock::duration in_denoiser{};
  try {
    const Clock::time_point t0 = Clock::now();
    encoder.Run(run_options, bb.encoder);
    bb.encoder.SynchronizeOutputs();  // cond complete before the denoiser session (its own stream) reads it
    const Clock::duration in_encoder = Clock::now() - t0;
    if (initial_noise) std::memcpy(x.data(), initial_noise, n * sizeof(float));
    else draw(x.data(), n);
    const auto& ks = steps[sampler];
    const int H = info.horizon, A = info.action_dim;
    if (inpaint.rows > 0) {
      std::memcpy(x_init.data(), x.data(), n * sizeof(float));
      detail::apply_inpaint(inpaint, ks[0].level_in.sqrt_a, ks[0].level_in.sqrt_1m_a, x.data(), x_init.data(), batch, H, A);
    }
    for (std::size_t k = 0; k < ks.size(); ++k) {
      const StepCoefficients& c = ks[k];
      std::fill(timestep.begin(), timestep.begin() + batch, c.timestep);
      const Clock::time_point d0 = Clock::now();
      denoiser.Run(run_options, bb.denoiser);
      bb.denoiser.SynchronizeOutputs();  // noise_pred is in `eps` (a no-op on the CPU)
      in_denoiser += Clock::now() - d0;
      const float* nz = nullptr;
      if (c.sigma > 0.0f) {
        if (step_noise) nz = step_noise + k * n;
        else {
          draw(noise.data(), n);
          nz = noise.data();
        }
      }
      detail::apply_step(c, clip, r, x.data(), eps.data(), nz, n);
      if (inpaint.rows > 0)
        detail::apply_inpaint(inpaint, c.level_out.sqrt_a, c.level_out.sqrt_1m_a, x.data(), x_init.data(), batch, H, A);
    }
    // Recorded only on success; sample() adds the total.
    timing.encoder_ms = std::chrono::duration<double, std::milli>(in_encoder).count();
    timing.denoiser_ms = std::chrono::duration<double, std::milli>(in_denoiser).count();
    timing.steps = static_cast<int>(ks.size());
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime failed while sampling: ") + e.what());
  }
}

// ---- the public API ------------------------------------------------------------------------------------

Policy::Policy(const std::string& bundle_dir, const PolicyParams& params) : impl_(std::make_unique<Impl>()) {
  try {
    impl_->load(bundle_dir, params);
  } catch (const std::bad_alloc&) {
    throw Error("out of memory while loading the bundle " + bundle_dir + " with max_batch = " +
                std::to_string(params.max_batch));
  }
}
Policy::~Policy() = default;
Policy::Policy(Policy&&) noexcept = default;
Policy& Policy::operator=(Policy&&) noexcept = default;

Policy::Impl& Policy::impl() const {
  if (!impl_) throw Error("dpkit::Policy used after it was moved from");
  return *impl_;
}

const PolicyInfo& Policy::info() const { return impl().info; }

const SampleTiming& Policy::last_timing() const { return impl().timing; }

Sampler Policy::find_sampler(const std::string& kind_in, int num_inference_steps) const {
  const Impl& im = impl();
  const auto& list = im.info.samplers;
  const std::size_t def = static_cast<std::size_t>(im.m.default_sampler);
  const std::string kind = kind_in.empty() ? list[def].sampler : kind_in;
  if (kind != "ddpm" && kind != "ddim" && kind != "fewstep")
    throw InputError("unknown sampler \"" + kind + "\" (expected ddpm, ddim or fewstep)");
  auto handle = [&](std::size_t i) {
    Sampler s;
    s.owner_ = im.id;
    s.index_ = static_cast<int>(i);
    s.info_ = list[i];
    return s;
  };
  if (num_inference_steps <= 0) {
    // dpkit.runtime.bundle.Schedule.find: the default sampler if it is of this kind, else the kind's largest K.
    if (list[def].sampler == kind) return handle(def);
    std::size_t best = list.size();
    for (std::size_t i = 0; i < list.size(); ++i)
      if (list[i].sampler == kind && (best == list.size() || list[i].num_inference_steps > list[best].num_inference_steps))
        best = i;
    if (best < list.size()) return handle(best);
  } else {
    for (std::size_t i = 0; i < list.size(); ++i)
      if (list[i].sampler == kind && list[i].num_inference_steps == num_inference_steps) return handle(i);
  }
  std::string names;
  for (const auto& s : list) names += (names.empty() ? "" : ", ") + s.name;
  throw InputError("bundle " + im.info.bundle_dir + " has no sampler " + kind +
                   (num_inference_steps > 0 ? " with " + std::to_string(num_inference_steps) + " steps" : "") +
                   "; available: " + names);
}

Sampler Policy::default_sampler() const {
  const Impl& im = impl();
  const auto& d = im.info.samplers[static_cast<std::size_t>(im.m.default_sampler)];
  return find_sampler(d.sampler, d.num_inference_steps);
}

void Policy::reseed(std::uint64_t seed) {
  Impl& im = impl();
  im.rng.seed(seed);
  im.normal.reset();
}

void Policy::sample(const SampleRequest& req, SampleOutput& out) {
  const auto t_start = std::chrono::steady_clock::now();
  Impl& im = impl();
  detail::Inpaint inpaint;
  const std::size_t sampler = im.check_request(req, out, inpaint);  // every check before the first copy
  im.copy_in(req, inpaint);
  im.run(req.batch, sampler, req.initial_noise.data, req.step_noise.data, inpaint);
  im.copy_out(req.batch, out);
  im.timing.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_start).count();
}

}  // namespace dpkit
