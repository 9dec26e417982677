// dpkit::Policy: bundle -> two ORT sessions + buffers sized for max_batch -> the K-step reverse loop.
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>

#include "internal.hpp"
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

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

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
std::size_t PolicyInfo::step_noise_size(int sampler, int batch) const {
  if (sampler < 0 || static_cast<std::size_t>(sampler) >= samplers.size())
    throw InputError("sampler index " + std::to_string(sampler) + " is out of range (the bundle has " +
                     std::to_string(samplers.size()) + ")");
  return static_cast<std::size_t>(samplers[static_cast<std::size_t>(sampler)].num_inference_steps) * trajectory_size(batch);
}

struct Policy::Impl {
  PolicyInfo info;
  Manifest m;
  std::vector<std::vector<StepCoefficients>> steps;  // per sampler

  // Owned buffers for max_batch; the Ort::Values below are views of them.
  std::vector<std::vector<float>> obs;
  std::vector<float> cond, x, eps, noise;
  std::vector<int64_t> timestep;

  // Every ORT object lives here, created only once the library is loaded: even a null Ort:: handle
  // calls into the API when destroyed, so none may exist before (e.g. when policy.json is bad).
  struct Views {
    std::vector<Ort::Value> enc_in;
    Ort::Value enc_out{nullptr};
    std::vector<Ort::Value> den_in;  // sample, timestep, cond
    Ort::Value den_out{nullptr};
  };
  struct OrtState {
    Ort::Session encoder{nullptr}, denoiser{nullptr};
    Ort::RunOptions run_options;
    std::vector<Views> views;  // tensors for each batch size b (index b - 1), made once at load
  };
  std::unique_ptr<OrtState> ort;
  std::vector<const char*> enc_in_names;
  const char* enc_out_names[1] = {"cond"};
  const char* den_in_names[3] = {"sample", "timestep", "cond"};
  const char* den_out_names[1] = {"noise_pred"};

  std::mt19937_64 rng;
  std::normal_distribution<float> normal;
  SampleTiming timing;

  void load(const std::string& dir, const PolicyParams& p);
  void make_views(int max_batch);
  void run(int batch, int sampler, const float* initial_noise, const float* step_noise);
  void draw(float* out, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) out[i] = normal(rng);
  }
};

void Policy::Impl::load(const std::string& dir, const PolicyParams& p) {
  if (p.max_batch < 1) throw InputError("PolicyParams::max_batch must be >= 1, got " + std::to_string(p.max_batch));
  if (p.intra_op_threads < 0) throw InputError("PolicyParams::intra_op_threads must be >= 0");
  m = detail::load_manifest(dir);

  const std::string enc_path = dir + "/" + m.encoder.file, den_path = dir + "/" + m.denoiser.file;
  for (const auto* e : {&m.encoder, &m.denoiser}) {
    const std::string path = dir + "/" + e->file;
    if (!is_file(path)) throw Error("missing model file " + path + " (named in " + dir + "/policy.json)");
    if (p.verify_sha256) {
      const std::string got = detail::sha256_file_hex(path);
      if (got != e->sha256)
        throw Error("sha256 mismatch for " + path + ": policy.json says " + e->sha256 + ", file has " + got +
                    " (the bundle was modified or is incomplete; re-export it)");
    }
  }

  const detail::OrtRuntime& rt = detail::ort_runtime(p.ort_library);
  ort = std::make_unique<OrtState>();
  Ort::Session& encoder = ort->encoder;
  Ort::Session& denoiser = ort->denoiser;
  const Ort::RunOptions& run_options = ort->run_options;
  std::vector<Views>& views = ort->views;
  PolicyParams enc_params = p;
  enc_params.allow_spinning = false;  // runs once per chunk; spinning would steal cores from the denoiser
  // TensorRT: the exporter's engines are reused only with its profile (batch 1..its max_batch, opt
  // min(8, max)); without exported engines ORT builds them at load into the same cache folder.
  detail::TrtSettings enc_trt, den_trt;
  if (p.provider == "tensorrt") {
    int trt_max = p.max_batch;
    if (m.has_tensorrt) {
      if (p.max_batch > m.tensorrt_max_batch)
        throw InputError("PolicyParams::max_batch = " + std::to_string(p.max_batch) + " exceeds the batch range 1.." +
                         std::to_string(m.tensorrt_max_batch) + " of the bundle's TensorRT engines (re-export with "
                         "dpkit-export --tensorrt --max-batch " + std::to_string(p.max_batch) + ")");
      trt_max = m.tensorrt_max_batch;
    }
    const int opt = std::max(1, std::min(8, trt_max));
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
      t->min_shapes = profile_shapes(*in, 1);
      t->opt_shapes = profile_shapes(*in, opt);
      t->max_shapes = profile_shapes(*in, trt_max);
    }
  }
  try {
    Ort::SessionOptions enc_opts = detail::make_session_options(enc_params, enc_trt);
    Ort::SessionOptions den_opts = detail::make_session_options(p, den_trt);
    encoder = Ort::Session(*rt.env, enc_path.c_str(), enc_opts);
    denoiser = Ort::Session(*rt.env, den_path.c_str(), den_opts);
  } catch (const Ort::Exception& e) {
    throw Error("ONNX Runtime could not load the bundle " + dir + ": " + e.what());
  }

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

  for (const auto& s : m.samplers) steps.push_back(detail::make_steps(m, s));

  info.bundle_dir = dir;
  info.obs_mode = m.obs_mode;
  info.n_obs_steps = To;
  info.horizon = H;
  info.n_action_steps = m.n_action_steps;
  info.action_dim = A;
  info.first_action_index = m.first_action_index;
  info.cond_dim = C;
  info.max_batch = p.max_batch;
  info.observations = m.observations;
  for (const auto& s : m.samplers) info.samplers.push_back({s.name, s.sampler, s.num_inference_steps});
  info.default_sampler = m.default_sampler;
  info.provider = p.provider;
  info.ort_version = rt.version;
  info.ort_library = rt.library;

  for (std::size_t i = 0; i < m.observations.size(); ++i) {
    obs.emplace_back(info.observation_size(i, p.max_batch), 0.0f);
    enc_in_names.push_back(info.observations[i].name.c_str());
  }
  cond.assign(static_cast<std::size_t>(p.max_batch) * C, 0.0f);
  x.assign(info.trajectory_size(p.max_batch), 0.0f);
  eps.assign(x.size(), 0.0f);
  noise.assign(x.size(), 0.0f);
  timestep.assign(static_cast<std::size_t>(p.max_batch), 0);
  make_views(p.max_batch);
  rng.seed(p.seed);

  // Warm-up: ORT allocates its arenas and plans on the first run of each shape; do it here, not in
  // the caller's first control cycle. Noise is zero so no generator draws are consumed.
  for (int b : {1, p.max_batch}) {
    try {
      encoder.Run(run_options, enc_in_names.data(), views[b - 1].enc_in.data(), enc_in_names.size(), enc_out_names,
                  &views[b - 1].enc_out, 1);
      denoiser.Run(run_options, den_in_names, views[b - 1].den_in.data(), 3, den_out_names, &views[b - 1].den_out, 1);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime failed on a warm-up run of " + dir + " at batch " + std::to_string(b) + ": " + e.what());
    }
  }
}

void Policy::Impl::make_views(int max_batch) {
  const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const int64_t To = m.n_obs_steps, H = m.horizon, A = m.action_dim, C = m.cond_dim;
  for (int b = 1; b <= max_batch; ++b) {
    Views v;
    for (std::size_t i = 0; i < obs.size(); ++i) {
      std::vector<int64_t> dims = {b, To};
      dims.insert(dims.end(), m.observations[i].shape.begin(), m.observations[i].shape.end());
      v.enc_in.push_back(Ort::Value::CreateTensor<float>(mem, obs[i].data(), info.observation_size(i, b), dims.data(), dims.size()));
    }
    const int64_t cdims[2] = {b, C}, xdims[3] = {b, H, A}, tdims[1] = {b};
    const std::size_t n = info.trajectory_size(b);
    v.enc_out = Ort::Value::CreateTensor<float>(mem, cond.data(), static_cast<std::size_t>(b * C), cdims, 2);
    v.den_in.push_back(Ort::Value::CreateTensor<float>(mem, x.data(), n, xdims, 3));
    v.den_in.push_back(Ort::Value::CreateTensor<int64_t>(mem, timestep.data(), static_cast<std::size_t>(b), tdims, 1));
    v.den_in.push_back(Ort::Value::CreateTensor<float>(mem, cond.data(), static_cast<std::size_t>(b * C), cdims, 2));
    v.den_out = Ort::Value::CreateTensor<float>(mem, eps.data(), n, xdims, 3);
    ort->views.push_back(std::move(v));
  }
}

// The hot path: no allocation, no tensor creation, no name lookups.
void Policy::Impl::run(int batch, int sampler, const float* initial_noise, const float* step_noise) {
  Views& v = ort->views[static_cast<std::size_t>(batch - 1)];
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
    encoder.Run(run_options, enc_in_names.data(), v.enc_in.data(), enc_in_names.size(), enc_out_names, &v.enc_out, 1);
    const Clock::duration in_encoder = Clock::now() - t0;
    if (initial_noise) std::memcpy(x.data(), initial_noise, n * sizeof(float));
    else draw(x.data(), n);
    const auto& ks = steps[static_cast<std::size_t>(sampler)];
    for (std::size_t k = 0; k < ks.size(); ++k) {
      const StepCoefficients& c = ks[k];
      std::fill(timestep.begin(), timestep.begin() + batch, c.timestep);
      const Clock::time_point d0 = Clock::now();
      denoiser.Run(run_options, den_in_names, v.den_in.data(), 3, den_out_names, &v.den_out, 1);
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
    }
    // Recorded only on success; sample() adds the total.
    timing.encoder_ms = std::chrono::duration<double, std::milli>(in_encoder).count();
    timing.denoiser_ms = std::chrono::duration<double, std::milli>(in_denoiser).count();
    timing.steps = static_cast<int>(ks.size());
  } catch (const Ort::Exception& e) {
    throw Error(std::string("ONNX Runtime failed while sampling: ") + e.what());
  }
}

Policy::Policy(const std::string& bundle_dir, const PolicyParams& params) : impl_(std::make_unique<Impl>()) {
  impl_->load(bundle_dir, params);
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

int Policy::find_sampler(const std::string& sampler, int num_inference_steps) const {
  const auto& list = impl().info.samplers;
  if (num_inference_steps <= 0) {
    // The Python backends' rule: the default sampler if it is of this kind, else the kind's largest K.
    const int def = impl().info.default_sampler;
    if (list[static_cast<std::size_t>(def)].sampler == sampler) return def;
    int best = -1;
    for (std::size_t i = 0; i < list.size(); ++i)
      if (list[i].sampler == sampler && (best < 0 || list[i].num_inference_steps > list[static_cast<std::size_t>(best)].num_inference_steps))
        best = static_cast<int>(i);
    if (best >= 0) return best;
  }
  for (std::size_t i = 0; i < list.size(); ++i)
    if (list[i].sampler == sampler && list[i].num_inference_steps == num_inference_steps) return static_cast<int>(i);
  std::string names;
  for (const auto& s : list) names += (names.empty() ? "" : ", ") + s.name;
  throw InputError("bundle " + impl_->info.bundle_dir + " has no sampler " + sampler +
                   (num_inference_steps > 0 ? " with " + std::to_string(num_inference_steps) + " steps" : "") +
                   "; available: " + names);
}

void Policy::reseed(std::uint64_t seed) {
  Impl& im = impl();
  im.rng.seed(seed);
  im.normal.reset();
}

void Policy::sample(const SampleRequest& req, const SampleOutput& out) {
  const auto t_start = std::chrono::steady_clock::now();
  Impl& im = impl();
  const PolicyInfo& info = im.info;
  const int B = req.batch;
  if (B < 1 || B > info.max_batch)
    throw InputError("batch " + std::to_string(B) + " is outside [1, max_batch = " + std::to_string(info.max_batch) +
                     "] (raise PolicyParams::max_batch)");
  const int sampler = req.sampler < 0 ? info.default_sampler : req.sampler;
  if (sampler >= static_cast<int>(info.samplers.size()))
    throw InputError("sampler index " + std::to_string(req.sampler) + " is not one of the bundle's " +
                     std::to_string(info.samplers.size()) + " samplers (use Policy::find_sampler)");
  if (req.observations.size() != info.observations.size())
    throw InputError("expected " + std::to_string(info.observations.size()) + " observation arrays (" +
                     info.observations[0].name + (info.observations.size() > 1 ? ", ..." : "") + "), got " +
                     std::to_string(req.observations.size()));

  // Checks build their message (and allocate) only on failure: the success path allocates nothing.
  auto expect = [](std::size_t got, std::size_t want, const auto& what, const auto& dims) {
    if (got != want)
      throw InputError(std::string(what) + ": expected shape " + shape_str(dims) + " = " + std::to_string(want) +
                       " floats, got " + std::to_string(got));
  };
  const int64_t b = B, To = info.n_obs_steps, H = info.horizon, A = info.action_dim;
  for (std::size_t i = 0; i < info.observations.size(); ++i) {
    const ObservationInfo& o = info.observations[i];
    const ConstFloatSpan& s = req.observations[i];
    const std::size_t n = info.observation_size(i, B);
    if ((s.data ? s.size : 0) != n) {
      std::vector<int64_t> dims = {b, To};
      dims.insert(dims.end(), o.shape.begin(), o.shape.end());
      expect(s.data ? s.size : 0, n, "observation '" + o.name + "'", dims);
    }
    if (!all_finite(s.data, n)) {
      const std::size_t at = first_non_finite(s.data, n);
      throw InputError("observation '" + o.name + "' holds " + (std::isnan(s.data[at]) ? "NaN" : "Inf") +
                       " at flat index " + std::to_string(at) + " (batch item " + std::to_string(at / (n / B)) + ")");
    }
    std::memcpy(im.obs[i].data(), s.data, n * sizeof(float));
  }
  const std::size_t n = info.trajectory_size(B);
  const int64_t K = info.samplers[static_cast<std::size_t>(sampler)].num_inference_steps;
  const int64_t Ta = info.n_action_steps;
  if (req.initial_noise.data) {
    expect(req.initial_noise.size, n, "initial_noise", std::array<int64_t, 3>{b, H, A});
    if (!all_finite(req.initial_noise.data, n)) throw InputError("initial_noise holds NaN or Inf");
  }
  if (req.step_noise.data) {
    expect(req.step_noise.size, static_cast<std::size_t>(K) * n, "step_noise", std::array<int64_t, 4>{K, b, H, A});
    if (!all_finite(req.step_noise.data, req.step_noise.size)) throw InputError("step_noise holds NaN or Inf");
  }
  if (out.trajectory.data) expect(out.trajectory.size, n, "output trajectory", std::array<int64_t, 3>{b, H, A});
  if (out.actions.data) expect(out.actions.size, info.actions_size(B), "output actions", std::array<int64_t, 3>{b, Ta, A});

  im.run(B, sampler, req.initial_noise.data, req.step_noise.data);

  if (out.trajectory.data) std::memcpy(out.trajectory.data, im.x.data(), n * sizeof(float));
  if (out.actions.data) {
    const float* scale = im.m.action_scale.data();
    const float* offset = im.m.action_offset.data();
    float* dst = out.actions.data;
    for (int bi = 0; bi < B; ++bi) {
      const float* src = im.x.data() + (static_cast<std::size_t>(bi) * H + info.first_action_index) * A;
      for (int j = 0; j < info.n_action_steps * A; ++j) *dst++ = src[j] * scale[j % A] + offset[j % A];
    }
  }
  im.timing.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_start).count();
}

}  // namespace dpkit
