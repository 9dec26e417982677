// dpkit runtime: sample a Diffusion Policy bundle (docs/bundle-format.md) over ONNX Runtime.
//
//   #include <dpkit/runtime.hpp>
//
//   dpkit::Policy policy("bundles/tiny");                        // CPU, 2 threads, batch 1, seed 0
//   const dpkit::PolicyInfo& info = policy.info();
//   std::vector<float> obs(info.observation_size(0));            // (1, To, 20) for a low-dim bundle
//   std::vector<float> actions(info.actions_size());             // (1, Ta, A), un-normalized
//   dpkit::SampleRequest req;                                    // once, outside the control loop:
//   req.observations = {{obs.data(), obs.size()}};
//   req.sampler = policy.find_sampler("ddim", 10);               // or policy.default_sampler()
//   dpkit::SampleOutput out;
//   out.actions = {actions.data(), actions.size()};
//   policy.sample(req, out);                                     // each cycle: refill obs, sample
//
// Thread safety: a Policy is NOT safe to use from two threads at once (it owns its buffers and random
// generator). Use one Policy per thread; separate Policy objects never share mutable state, so they may
// sample concurrently. `info()`, `find_sampler()` and `default_sampler()` are const and may be called
// from any thread while no other thread moves or destroys the Policy. (The Python module serializes
// calls on one object with a lock.)
//
// Errors: every failure throws dpkit::Error (a std::runtime_error) whose message names the file, tensor
// or expected shape. Bad caller input (shapes, NaN/Inf, a sampler handle of another Policy, an absurd
// max_batch) throws dpkit::InputError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dpkit {

// Any failure: unreadable or inconsistent bundle, ONNX Runtime errors, unavailable providers.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The caller passed something wrong (shape, size, NaN/Inf, unknown sampler, batch too large).
class InputError : public Error {
 public:
  using Error::Error;
};

// Read-only view of caller memory: `size` floats at `data`.
struct ConstFloatSpan {
  const float* data = nullptr;
  std::size_t size = 0;
};

// Writable view of caller memory.
struct FloatSpan {
  float* data = nullptr;
  std::size_t size = 0;
};

// Largest buffer memory a Policy preallocates at load (observations, condition, sample, noise, all for
// max_batch); a max_batch needing more is an InputError before anything is allocated.
constexpr std::size_t kMaxBufferBytes = std::size_t{4} << 30;  // 4 GiB
// Largest PolicyParams::max_batch. Load makes one pair of ONNX Runtime bindings per batch size
// 1..max_batch (measured on CPU: about 0.7 ms and 55 KB each, so 4096 loads in about 3 s).
constexpr int kMaxBatchLimit = 4096;

struct PolicyParams {
  // Execution provider: "cpu", "cuda" or "tensorrt". An unavailable one is an Error, never a fallback.
  std::string provider = "cpu";
  // ONNX Runtime intra-op threads per session (0 = ORT's default, one per core).
  int intra_op_threads = 2;
  // Let idle intra-op threads spin between runs: lower latency, more CPU burned.
  bool allow_spinning = true;
  // Largest batch `sample` accepts, 1..kMaxBatchLimit; buffers are sized for it at load (at most
  // kMaxBufferBytes of them).
  int max_batch = 1;
  // Seed of the generator that draws noise the caller does not inject.
  std::uint64_t seed = 0;
  // Path of libonnxruntime.so. Empty: $DPKIT_ORT_LIBRARY, then the system's libonnxruntime.so.1.
  // The library is loaded once per process; later Policies reuse the first one loaded.
  std::string ort_library;
  // Check the sha256 of encoder.onnx / denoiser.onnx against policy.json before loading them.
  bool verify_sha256 = true;
  // GPU index for the "cuda" and "tensorrt" providers.
  int device_id = 0;
};

struct ObservationInfo {
  std::string name;             // encoder input name, e.g. "obs", "image", "agent_pos"
  std::vector<int64_t> shape;   // per step, without B and To, e.g. {20} or {3, 96, 96}
  std::size_t step_size = 0;    // product of `shape`
};

// One of the bundle's samplers, as listed in PolicyInfo::samplers.
struct SamplerInfo {
  std::string name;              // e.g. "ddim-10"
  std::string sampler;           // "ddpm" or "ddim"
  int num_inference_steps = 0;   // K
  bool uses_step_noise = false;  // whether a step adds noise (DDPM); DDIM (eta = 0) ignores step_noise
};

// A sampler of one particular Policy, from Policy::find_sampler or Policy::default_sampler. Cheap to
// copy; look it up once, outside the control loop. A default-constructed Sampler, or one from another
// Policy, makes `sample` throw InputError. It stays valid when its Policy is moved.
class Sampler {
 public:
  Sampler() = default;
  const std::string& name() const { return info_.name; }           // e.g. "ddim-10"
  const std::string& sampler() const { return info_.sampler; }     // "ddpm" or "ddim" ("" when empty)
  int num_inference_steps() const { return info_.num_inference_steps; }
  bool uses_step_noise() const { return info_.uses_step_noise; }
  explicit operator bool() const { return owner_ != 0; }

 private:
  friend class Policy;
  std::uint64_t owner_ = 0;  // id of the Policy that made it (0: none)
  int index_ = -1;           // into PolicyInfo::samplers
  SamplerInfo info_;
};

// What the bundle describes, plus what this Policy was built with.
struct PolicyInfo {
  std::string bundle_dir;
  std::string obs_mode;          // "lowdim" or "image"
  int n_obs_steps = 0;           // To
  int horizon = 0;               // H
  int n_action_steps = 0;        // Ta
  int action_dim = 0;            // A
  int first_action_index = 0;
  int cond_dim = 0;              // C
  int max_batch = 0;
  std::vector<ObservationInfo> observations;  // encoder inputs, in graph order
  std::vector<float> action_scale, action_offset;  // (A,): actions = trajectory * scale + offset
  std::vector<SamplerInfo> samplers;          // in policy.json order
  std::string default_sampler;   // name of the bundle's default sampler
  std::string provider;          // the provider in use ("cpu", "cuda", "tensorrt")
  std::string ort_version;       // version string of the loaded ONNX Runtime library
  std::string ort_library;       // path it was loaded from

  // Float counts for a batch of `batch`: observation i (batch, To, *shape), trajectory (batch, H, A),
  // actions (batch, Ta, A), step noise for `sampler` (K, batch, H, A).
  std::size_t observation_size(std::size_t i, int batch = 1) const;
  std::size_t trajectory_size(int batch = 1) const;
  std::size_t actions_size(int batch = 1) const;
  std::size_t step_noise_size(const Sampler& sampler, int batch = 1) const;
};

struct SampleRequest {
  int batch = 1;
  // One span per PolicyInfo::observations entry, in that order: (batch, To, *shape) float32, C order.
  std::vector<ConstFloatSpan> observations;
  // Required: from Policy::find_sampler or Policy::default_sampler of the Policy that samples.
  Sampler sampler;
  // Optional injected noise (empty span = draw from the Policy's generator):
  // initial sample (batch, H, A) and per-step noise (K, batch, H, A) (used only when
  // sampler.uses_step_noise()).
  ConstFloatSpan initial_noise;
  ConstFloatSpan step_noise;
};

// Where `sample` writes: caller memory, at least one of the two (both empty is an InputError).
struct SampleOutput {
  FloatSpan trajectory;  // optional: (batch, H, A), normalized
  FloatSpan actions;     // optional: (batch, Ta, A), un-normalized executed actions
};

// Where the time of the last `sample` call went (steady clock, milliseconds). Cheap to record: two clock
// reads per step. `loop_ms()` is everything the runtime did besides running the two networks (input
// checks and copies, noise, the reverse-step arithmetic, un-normalization): the sampler's own overhead.
struct SampleTiming {
  double total_ms = 0;     // the whole call
  double encoder_ms = 0;   // encoder.onnx
  double denoiser_ms = 0;  // all K denoiser.onnx runs
  int steps = 0;           // K
  double loop_ms() const { return total_ms - encoder_ms - denoiser_ms; }
};

// A loaded bundle with its ONNX Runtime sessions and preallocated buffers. Move-only.
class Policy {
 public:
  explicit Policy(const std::string& bundle_dir, const PolicyParams& params = PolicyParams());
  ~Policy();
  Policy(Policy&&) noexcept;
  Policy& operator=(Policy&&) noexcept;
  Policy(const Policy&) = delete;
  Policy& operator=(const Policy&) = delete;

  const PolicyInfo& info() const;

  // The bundle's sampler of kind `sampler` ("ddpm" or "ddim"; "" = the default sampler's kind) with
  // `num_inference_steps` steps (<= 0: the default sampler when it is of that kind, else the kind's
  // largest K) -- the rule of dpkit.runtime.bundle.Schedule.find. InputError lists the available ones.
  Sampler find_sampler(const std::string& sampler = "", int num_inference_steps = 0) const;
  Sampler default_sampler() const;

  // Restart the noise generator (same seed => same noise sequence).
  void reseed(std::uint64_t seed);

  // Encode the observations once, run the K reverse steps, write the results into `out`'s spans.
  // dpkit allocates nothing here: every buffer and tensor was made for batches 1..max_batch at load,
  // and ONNX Runtime was warmed up at batch 1 and max_batch (its first run at another batch size
  // plans that shape once). On an error nothing is written to `out`.
  void sample(const SampleRequest& request, SampleOutput& out);

  // Timing of the last successful `sample` call (zeros before the first).
  const SampleTiming& last_timing() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Impl& impl() const;  // Error when used after a move
};

// Version string of the ONNX Runtime library a Policy loaded ("" before the first Policy).
std::string ort_version();

}  // namespace dpkit
