// dpkit runtime: sample a Diffusion Policy bundle (docs/bundle-format.md) over ONNX Runtime.
//
//   #include <dpkit/runtime.hpp>
//
//   dpkit::Policy policy("bundles/tiny");                        // CPU, 1 thread, batch 1, seed 0
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
#include <functional>
#include <memory>
#include <mutex>
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
  // ONNX Runtime intra-op threads per session (0 = ORT's default, one per core). Default 1, dpkit's thread
  // rule for a small model (dpkit/threads.py, where the rule and its measurements live; the Python backends'
  // `threads=` applies it): the `tiny` DDIM-10 chunk beside one busy process took 50.1 ms p50 on 1 thread,
  // 64.5 on 2 without spinning, 135.6 on 2 with spinning (2-core VM). Bigger models gain from about one
  // thread per 20 M parameters, up to the cores this process may use. (The default used to be 2.)
  int intra_op_threads = 1;
  // Let idle intra-op threads busy-wait between runs. Default false: a spinning thread burns the core a
  // descheduled sibling needs, which doubled the chunk time above; without a competitor spinning saves only
  // the wake-up latency (microseconds per run). (The default used to be true.)
  bool allow_spinning = false;
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
  std::string sampler;           // "ddpm", "ddim" or "fewstep"
  int num_inference_steps = 0;   // K
  bool uses_step_noise = false;  // whether a step adds noise (DDPM); DDIM (eta = 0) ignores step_noise
};

// A sampler of one particular Policy, from Policy::find_sampler or Policy::default_sampler. Cheap to
// copy; look it up once, outside the control loop. A default-constructed Sampler, or one from another
// Policy, makes `sample` throw InputError. It stays valid when its Policy is moved.
class RealTimeController;
class Sampler {
 public:
  Sampler() = default;
  const std::string& name() const { return info_.name; }           // e.g. "ddim-10"
  const std::string& sampler() const { return info_.sampler; }     // "ddpm", "ddim" or "fewstep" ("" when empty)
  int num_inference_steps() const { return info_.num_inference_steps; }
  bool uses_step_noise() const { return info_.uses_step_noise; }
  explicit operator bool() const { return owner_ != 0; }

 private:
  friend class Policy;
  friend class RealTimeController;
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
  std::string precision;         // the denoiser's weights: "fp32", "fp16" or "int8" (docs/bundle-format.md)
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
  // Optional committed prefix (inpainting; empty span = none): `prefix_rows` = P rows of normalized
  // actions (batch, P, A) that the trajectory must continue at rows prefix_start .. prefix_start + P - 1
  // (prefix_start -1 = PolicyInfo::first_action_index), with optional per-row weights (P,) in [0, 1]
  // (empty = all 1). After the initial sample and after every reverse step, row j becomes
  //   w_j * (sqrt(a) * prefix_j + sqrt(1 - a) * initial_noise_j) + (1 - w_j) * x_j
  // with `a` the alpha_cumprod of the level x is at: a weight-1 row ends as the prefix itself (the same
  // arithmetic as dpkit.runtime.sampling.Inpaint). The prefix is copied into buffers made at load.
  ConstFloatSpan prefix;
  int prefix_rows = 0;
  int prefix_start = -1;
  ConstFloatSpan prefix_weights;
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

  // The bundle's sampler of kind `sampler` ("ddpm", "ddim" or "fewstep"; "" = the default sampler's kind) with
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

// ---- real-time chunk execution ---------------------------------------------------------------------------
//
//   dpkit::Policy policy("bundles/tiny");
//   dpkit::ControllerParams cp;                       // async-inpaint, delay measured online, 10 Hz
//   dpkit::RealTimeController ctl(policy, cp);        // references `policy`, starts the worker thread
//   std::vector<float> action(policy.info().action_dim);
//   for (;;) {                                        // every control period:
//     ctl.step(obs_now.data(), action.data());        // (B, *shape) in, (B, A) out, at once
//   }
//
// One observation in, one action out, every tick, while the next chunk is sampled on a worker thread --
// the rules of the Python reference dpkit.runtime.realtime.RealTimeController (same names):
//  * start-up: the first tick waits for the first chunk (there is nothing to execute before it);
//  * async modes: when the actions left in the current chunk fall to expected_delay() + margin, the next
//    chunk is requested from the latest To-step history, and switched in at index n - request_tick;
//  * sync: the next chunk is requested when the current one is exhausted; the last action is held
//    (wait_ticks) until it arrives, and it executes from its first action;
//  * async_inpaint: the request carries the old trajectory's rows for the d ticks that execute meanwhile
//    (weight 1) and `blend` more with weights 1 - (j - d + 1) / (blend + 1) (SampleRequest::prefix);
//  * a chunk exhausted while the next is pending holds the last action: a deadline miss (async modes).
// Time: delay >= 0 makes time virtual: the chunk requested at tick n is delivered at tick n + d exactly
// (step waits for the worker if needed), so runs are reproducible. delay = -1 is wall-clock time: a chunk
// is delivered at the first step after it is done, and d = ceil(max recent latency / period).
// Noise: request r samples with the Policy's generator reseeded to request_seed(seed, r).
//
// Ownership and threads: the controller references the Policy, which must outlive it; after
// construction the Policy is used only by the controller's worker thread -- do not call it yourself
// until close() (or pass `policy_mutex`, which the worker holds around each sample and you hold around
// yours). `step`, `close`, `stats` and the accessors are for one control thread. An exception in the
// worker is rethrown by the `step` that would deliver its chunk. close() (and the destructor) let a chunk
// being sampled finish, drop one not yet started, and join the worker; step after close is an InputError.

enum class Execution { sync, async, async_inpaint };

struct ControllerParams {
  Execution execution = Execution::async_inpaint;
  int delay = -1;   // inference delay d in ticks, 0..n_action_steps; -1 = measured online (wall clock)
  int margin = 0;   // request this many ticks earlier than d requires, 0..n_action_steps
  int blend = 0;    // async_inpaint: blended rows after the d hard ones, 0..1000000
  Sampler sampler;  // of the controlled Policy; empty = its default sampler
  std::uint64_t seed = 0;  // request r draws its noise from request_seed(seed, r)
  double period = 0.1;     // seconds per tick (for the measured delay)
  int batch = 1;           // B, 1..max_batch
  int history = 8;         // latencies the measured delay looks back over, >= 1
  // Seconds, monotonic; read by the worker thread before and after each chunk (latency). Empty: the
  // steady clock. Tests inject a virtual one.
  std::function<double()> clock;
  std::mutex* policy_mutex = nullptr;  // see "Ownership and threads"
  // A shared robot computer: pin the worker thread to these CPUs (empty: no pinning). With
  // PolicyParams::intra_op_threads = 1 (the default) ONNX Runtime computes on the calling thread, so this
  // pins the whole chunk computation; with more threads ORT's pool threads stay unpinned. Keep the control
  // thread and the camera/middleware threads off these CPUs.
  std::vector<int> worker_cpus;
  // Run the worker under SCHED_FIFO at this priority (1..99; 0 = the normal scheduler). A chunk then
  // preempts every normal thread on its CPU until it is done; a control loop that must never wait for it
  // should run at a higher priority or on another CPU.
  int worker_priority = 0;
  // Neither option is an error when the OS refuses it (SCHED_FIFO needs CAP_SYS_NICE or an RLIMIT_RTPRIO
  // at least the priority; a CPU outside this process's affinity mask is refused): the controller runs
  // without it, and RealTimeController::worker_setup() says what was applied and what was refused, and why.
  // Out-of-range values (a negative CPU, a priority outside 0..99) are an InputError.
};

// Counters since construction. Latencies (seconds, the most recent kMaxLatencySamples chunks).
struct ControllerStats {
  static constexpr std::size_t kMaxLatencySamples = 100000;
  std::int64_t ticks = 0;
  std::int64_t requests = 0;         // chunks requested (the last may still be pending)
  std::int64_t chunks = 0;           // chunks switched in
  std::int64_t deadline_misses = 0;  // async: ticks with nothing left to execute while a chunk was pending
  std::int64_t wait_ticks = 0;       // sync: ticks holding the last action while the next chunk is computed
  std::vector<double> latencies_s;   // in delivery order
  // Linear-interpolated percentile of latencies_s (q in [0, 100], numpy's default); 0 when empty.
  double latency_percentile(double q) const;
};

class RealTimeController {
 public:
  RealTimeController(Policy& policy, const ControllerParams& params);
  ~RealTimeController();  // close()
  RealTimeController(const RealTimeController&) = delete;
  RealTimeController& operator=(const RealTimeController&) = delete;

  // Feed this tick's observation -- one span per PolicyInfo::observations entry, (batch, *shape) -- and
  // get this tick's action (batch, A), un-normalized. Allocates nothing.
  void step(const std::vector<ConstFloatSpan>& observations, FloatSpan action);
  // The same for a bundle with one observation input: obs (batch, *shape) floats, action (batch, A).
  void step(const float* observation, float* action);

  bool switched() const;      // whether the last step's action came from a chunk switched in at that tick
  int expected_delay() const; // d in ticks: fixed, or measured (1 before the first chunk)
  ControllerStats stats() const;  // a copy (allocates; call it outside the control loop)
  // What ControllerParams::worker_cpus / worker_priority did, one sentence each, e.g. "worker pinned to
  // CPUs 1" or "SCHED_FIFO priority 50 refused (Operation not permitted: ...); normal scheduling"; "" when
  // neither was asked for.
  const std::string& worker_setup() const;
  void close();

  // The seed of request r's noise (a splitmix64 mix of both).
  static std::uint64_t request_seed(std::uint64_t seed, std::uint64_t request);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpkit
