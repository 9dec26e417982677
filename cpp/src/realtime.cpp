// dpkit::RealTimeController: the tick schedule of dpkit.runtime.realtime (the Python reference), with
// the chunks sampled on one worker thread. See the header for the rules; the comments here say how.
//
// Threads: the control thread owns the schedule (history, current chunk, index, stats). It hands a job
// to the worker only while none is pending (one request at a time), so the job buffers are written by
// the control thread while the worker is idle, and the result buffers by the worker while a job is
// pending; `mu` + `cv` around has_job / done order the two. Every buffer is sized at construction: the
// control path (step) allocates nothing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <thread>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>

#include <cerrno>
#include <cstring>
#endif

#include "dpkit/runtime.hpp"

namespace dpkit {

namespace {

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool finite(const float* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

// Pin `t` to `cpus` and/or give it SCHED_FIFO at `priority`; never throws for what the OS refuses: the
// result says what was applied and what was refused (ControllerParams, "A shared robot computer").
std::string apply_worker_options(std::thread& t, const std::vector<int>& cpus, int priority) {
  std::string out;
  auto add = [&out](const std::string& s) { out += (out.empty() ? "" : "; ") + s; };
  std::string list;
  for (int c : cpus) list += (list.empty() ? "" : ",") + std::to_string(c);
#if defined(__linux__)
  if (!cpus.empty()) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int c : cpus)
      if (c < CPU_SETSIZE) CPU_SET(c, &set);
    const int rc = pthread_setaffinity_np(t.native_handle(), sizeof(set), &set);
    add(rc == 0 ? "worker pinned to CPUs " + list
                : "worker CPU affinity {" + list + "} refused (" + std::strerror(rc) +
                      ": CPUs outside this process's affinity mask?); the worker runs on any CPU");
  }
  if (priority > 0) {
    sched_param sp{};
    sp.sched_priority = priority;
    const int rc = pthread_setschedparam(t.native_handle(), SCHED_FIFO, &sp);
    add(rc == 0 ? "worker at SCHED_FIFO priority " + std::to_string(priority)
                : "SCHED_FIFO priority " + std::to_string(priority) + " refused (" + std::strerror(rc) +
                      ": needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the priority); normal scheduling");
  }
#else
  if (!cpus.empty()) add("worker CPU affinity is not supported on this platform; the worker runs on any CPU");
  if (priority > 0) add("SCHED_FIFO is not supported on this platform; normal scheduling");
#endif
  return out;
}

}  // namespace

std::uint64_t RealTimeController::request_seed(std::uint64_t seed, std::uint64_t request) {
  // splitmix64 of the seed, then of that mixed with the request index: nearby (seed, r) pairs give
  // unrelated generator seeds.
  auto mix = [](std::uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  return mix(mix(seed) ^ request);
}

double ControllerStats::latency_percentile(double q) const {
  if (latencies_s.empty()) return 0.0;
  std::vector<double> v = latencies_s;
  std::sort(v.begin(), v.end());
  const double pos = std::min(std::max(q, 0.0), 100.0) / 100.0 * static_cast<double>(v.size() - 1);
  const std::size_t lo = static_cast<std::size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

struct RealTimeController::Impl {
  Impl(Policy& policy_, const ControllerParams& params) : policy(policy_), p(params) {}

  Policy& policy;
  ControllerParams p;
  int B = 1, H = 0, A = 0, Ta = 0, To = 0, fai = 0;
  std::vector<std::size_t> step_sizes;  // floats per observation step (one batch item)
  std::vector<std::string> obs_names;
  std::vector<ConstFloatSpan> one_obs = std::vector<ConstFloatSpan>(1);  // step(const float*, float*)'s

  // ---- control thread ----
  bool closed = false;
  bool switched = false;
  ControllerStats st;
  std::vector<double> latencies;  // ring of ControllerStats::kMaxLatencySamples
  std::size_t latency_count = 0;
  std::vector<double> recent;     // ring of p.history latencies for the measured delay
  std::size_t recent_count = 0;
  std::vector<std::vector<float>> history;  // per observation: (B, To, *shape)
  bool have_history = false, have_chunk = false, pending = false;
  std::int64_t chunk_tick = 0, pending_tick = 0, index = 0;
  std::vector<float> traj, actions, last;  // current chunk (B, H, A), (B, Ta, A); last action (B, A)

  // ---- the job (written by the control thread while the worker is idle) ----
  std::vector<std::vector<float>> job_obs;
  std::vector<float> job_prefix, job_weights;
  SampleRequest req;  // its observation spans point into job_obs (made once)
  std::uint64_t job_seed = 0;
  // ---- the result (written by the worker while a job is pending) ----
  std::vector<float> res_traj, res_actions;
  double res_latency = 0;
  std::exception_ptr res_error;

  std::mutex mu;
  std::condition_variable cv;
  bool has_job = false, done = false, stop = false;
  std::thread worker;
  std::string worker_setup;  // what worker_cpus / worker_priority did (set once, at construction)

  double now() const { return p.clock ? p.clock() : steady_seconds(); }
  std::int64_t remaining() const { return have_chunk ? Ta - index : 0; }
  bool exhausted() const { return remaining() <= 0; }

  int expected_delay() const {
    if (p.delay >= 0) return p.delay;
    if (recent_count == 0) return 1;
    const std::size_t n = std::min(recent_count, recent.size());
    const double worst = *std::max_element(recent.begin(), recent.begin() + static_cast<std::ptrdiff_t>(n));
    return static_cast<int>(std::min(std::ceil(worst / p.period), static_cast<double>(Ta)));
  }

  void work() {
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      cv.wait(lock, [this] { return has_job || stop; });
      if (stop) return;  // a job not started yet is dropped
      lock.unlock();
      double latency = 0;
      std::exception_ptr error;
      try {
        SampleOutput out{{res_traj.data(), res_traj.size()}, {res_actions.data(), res_actions.size()}};
        const double t0 = now();
        {
          std::unique_lock<std::mutex> shared;
          if (p.policy_mutex) shared = std::unique_lock<std::mutex>(*p.policy_mutex);
          policy.reseed(job_seed);
          policy.sample(req, out);
        }
        latency = now() - t0;
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      res_latency = latency;
      res_error = error;
      has_job = false;
      done = true;
      cv.notify_all();
    }
  }

  void observe(const std::vector<ConstFloatSpan>& obs) {
    for (std::size_t i = 0; i < history.size(); ++i) {
      const std::size_t s = step_sizes[i], item = static_cast<std::size_t>(To) * s;
      for (int b = 0; b < B; ++b) {
        float* h = history[i].data() + static_cast<std::size_t>(b) * item;
        const float* o = obs[i].data + static_cast<std::size_t>(b) * s;
        if (!have_history) {  // as in training: the first observation repeated To times
          for (int t = 0; t < To; ++t) std::memcpy(h + t * s, o, s * sizeof(float));
        } else {
          std::memmove(h, h + s, (item - s) * sizeof(float));
          std::memcpy(h + item - s, o, s * sizeof(float));
        }
      }
    }
    have_history = true;
  }

  // The old trajectory's rows for ticks n .. n + d - 1 (weight 1) and `blend` more (decaying weights).
  void set_prefix(std::int64_t n) {
    req.prefix = {};
    req.prefix_rows = 0;
    req.prefix_weights = {};
    const int d = expected_delay();
    const std::int64_t first = fai + (n - chunk_tick);  // row of the old trajectory at tick n
    const std::int64_t rows = std::min<std::int64_t>(static_cast<std::int64_t>(d) + p.blend, H - first);
    if (d == 0 || rows <= 0) return;
    const std::size_t row_floats = static_cast<std::size_t>(rows) * A;
    for (int b = 0; b < B; ++b)
      std::memcpy(job_prefix.data() + b * row_floats,
                  traj.data() + (static_cast<std::size_t>(b) * H + static_cast<std::size_t>(first)) * A,
                  row_floats * sizeof(float));
    for (std::int64_t j = 0; j < rows; ++j)
      job_weights[static_cast<std::size_t>(j)] =
          j < d ? 1.0f : static_cast<float>(1.0 - static_cast<double>(j - d + 1) / static_cast<double>(p.blend + 1));
    req.prefix = {job_prefix.data(), static_cast<std::size_t>(B) * row_floats};
    req.prefix_rows = static_cast<int>(rows);
    req.prefix_start = fai;
    req.prefix_weights = {job_weights.data(), static_cast<std::size_t>(rows)};
  }

  void request(std::int64_t n, bool with_prefix) {
    for (std::size_t i = 0; i < history.size(); ++i)
      std::memcpy(job_obs[i].data(), history[i].data(), history[i].size() * sizeof(float));
    if (with_prefix) {
      set_prefix(n);
    } else {
      req.prefix = {};
      req.prefix_rows = 0;
      req.prefix_weights = {};
    }
    job_seed = request_seed(p.seed, static_cast<std::uint64_t>(st.requests));
    st.requests += 1;
    pending = true;
    pending_tick = n;
    {
      std::lock_guard<std::mutex> lock(mu);
      has_job = true;
      done = false;
    }
    cv.notify_all();
  }

  void poll(std::int64_t n) {
    if (!pending) return;
    if (p.delay >= 0) {  // virtual time: delivered exactly d ticks after the request
      if (n >= pending_tick + p.delay) deliver(n, -1);
      return;
    }
    bool ready;
    {
      std::lock_guard<std::mutex> lock(mu);
      ready = done;
    }
    if (ready) deliver(n, -1);
  }

  void deliver(std::int64_t n, std::int64_t at_index) {
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [this] { return done; });
      done = false;
      error = res_error;
      res_error = nullptr;
    }
    pending = false;
    if (error) {
      try {
        std::rethrow_exception(error);
      } catch (const InputError& e) {
        throw InputError(std::string("sampling a chunk failed: ") + e.what());
      } catch (const std::exception& e) {
        throw Error(std::string("sampling a chunk failed: ") + e.what());
      } catch (...) {
        throw Error("sampling a chunk failed: an unknown exception");
      }
    }
    latencies[latency_count % latencies.size()] = res_latency;
    ++latency_count;
    recent[recent_count % recent.size()] = res_latency;
    ++recent_count;
    st.chunks += 1;
    std::swap(traj, res_traj);
    std::swap(actions, res_actions);
    chunk_tick = pending_tick;
    have_chunk = true;
    // async: the new chunk's action 0 belongs to tick `pending_tick`; n - pending_tick ticks have passed.
    index = at_index >= 0 ? at_index : (p.execution == Execution::sync ? 0 : std::min<std::int64_t>(n - pending_tick, Ta));
    switched = true;
  }

  void check_step(const std::vector<ConstFloatSpan>& obs, const FloatSpan& action) const {
    // From what the constructor read: the worker may be using the Policy right now.
    if (obs.size() != obs_names.size())
      throw InputError("RealTimeController::step: expected " + std::to_string(obs_names.size()) +
                       " observation arrays, got " + std::to_string(obs.size()));
    for (std::size_t i = 0; i < obs.size(); ++i) {
      const std::size_t want = static_cast<std::size_t>(B) * step_sizes[i];
      if (!obs[i].data || obs[i].size != want)
        throw InputError("RealTimeController::step: observation '" + obs_names[i] + "' must be (batch " +
                         std::to_string(B) + ", one step) = " + std::to_string(want) + " floats, got " +
                         std::to_string(obs[i].data ? obs[i].size : 0));
      if (!finite(obs[i].data, want))
        throw InputError("RealTimeController::step: observation '" + obs_names[i] + "' holds NaN or Inf");
    }
    const std::size_t want = static_cast<std::size_t>(B) * A;
    if (!action.data || action.size != want)
      throw InputError("RealTimeController::step: the action output must be (batch, A) = " + std::to_string(want) +
                       " floats, got " + std::to_string(action.data ? action.size : 0));
  }

  void step(const std::vector<ConstFloatSpan>& obs, FloatSpan action) {
    if (closed) throw InputError("the RealTimeController is closed");
    check_step(obs, action);
    const std::int64_t n = st.ticks;
    switched = false;
    observe(obs);
    if (!have_chunk && !pending) {  // start-up: the first chunk is awaited
      request(n, false);
      deliver(n, 0);
    } else {
      poll(n);
    }
    if (exhausted() && !pending) {  // sync (or a chunk that ran out): ask now
      request(n, false);
      poll(n);
    }
    if (!exhausted() && !pending && p.execution != Execution::sync && remaining() <= expected_delay() + p.margin) {
      request(n, p.execution == Execution::async_inpaint);
      poll(n);
    }
    st.ticks += 1;
    const std::size_t row = static_cast<std::size_t>(A);
    if (exhausted()) {  // nothing to execute yet: hold the last target
      (p.execution == Execution::sync ? st.wait_ticks : st.deadline_misses) += 1;
    } else {
      for (int b = 0; b < B; ++b)
        std::memcpy(last.data() + b * row,
                    actions.data() + (static_cast<std::size_t>(b) * Ta + static_cast<std::size_t>(index)) * row,
                    row * sizeof(float));
      ++index;
    }
    std::memcpy(action.data, last.data(), last.size() * sizeof(float));
  }

  void close() {
    if (closed && !worker.joinable()) return;
    closed = true;
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (worker.joinable()) worker.join();
  }
};

RealTimeController::RealTimeController(Policy& policy, const ControllerParams& params)
    : impl_(std::make_unique<Impl>(policy, params)) {
  Impl& im = *impl_;
  const PolicyInfo& info = policy.info();  // Error when the Policy was moved from
  ControllerParams& p = im.p;
  const int ta = info.n_action_steps;
  auto range = [](const char* name, long long v, long long lo, long long hi, const std::string& why) {
    if (v < lo || v > hi)
      throw InputError(std::string("ControllerParams::") + name + " must be in [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "]" + why + ", got " + std::to_string(v));
  };
  const std::string ticks = " ticks (n_action_steps = " + std::to_string(ta) + ")";
  range("delay", p.delay, -1, ta, ticks + "; -1 = measured");
  range("margin", p.margin, 0, ta, ticks);
  range("blend", p.blend, 0, 1000000, " rows");
  range("batch", p.batch, 1, info.max_batch, " (PolicyParams::max_batch)");
  range("history", p.history, 1, 1000000, " chunks");
  range("worker_priority", p.worker_priority, 0, 99, " (SCHED_FIFO; 0 = normal scheduling)");
  for (int c : p.worker_cpus) range("worker_cpus entry", c, 0, 1023, " (a CPU number)");
  if (!(p.period > 0.0) || !std::isfinite(p.period))
    throw InputError("ControllerParams::period must be a positive number of seconds, got " + std::to_string(p.period));
  if (p.execution != Execution::sync && p.execution != Execution::async && p.execution != Execution::async_inpaint)
    throw InputError("ControllerParams::execution is not sync, async or async_inpaint");
  if (!p.sampler) p.sampler = policy.default_sampler();
  else if (p.sampler.owner_ != policy.default_sampler().owner_)
    throw InputError("ControllerParams::sampler " + p.sampler.name() + " was made by another Policy");

  im.B = p.batch;
  im.H = info.horizon;
  im.A = info.action_dim;
  im.Ta = ta;
  im.To = info.n_obs_steps;
  im.fai = info.first_action_index;
  for (std::size_t i = 0; i < info.observations.size(); ++i) {
    im.step_sizes.push_back(info.observations[i].step_size);
    im.obs_names.push_back(info.observations[i].name);
    im.history.emplace_back(info.observation_size(i, im.B), 0.0f);
    im.job_obs.emplace_back(info.observation_size(i, im.B), 0.0f);
  }
  im.req.batch = im.B;
  im.req.sampler = p.sampler;
  for (const auto& o : im.job_obs) im.req.observations.push_back({o.data(), o.size()});
  for (auto* v : {&im.traj, &im.res_traj, &im.job_prefix}) v->assign(info.trajectory_size(im.B), 0.0f);
  for (auto* v : {&im.actions, &im.res_actions}) v->assign(info.actions_size(im.B), 0.0f);
  im.job_weights.assign(static_cast<std::size_t>(im.H), 0.0f);
  im.last.assign(static_cast<std::size_t>(im.B) * im.A, 0.0f);
  im.latencies.assign(ControllerStats::kMaxLatencySamples, 0.0);
  im.recent.assign(static_cast<std::size_t>(p.history), 0.0);
  im.worker = std::thread([&im] { im.work(); });  // last: nothing above may throw once it runs
  // Applied from here, before the first job can reach the worker; refusals are reported, never thrown.
  try {
    im.worker_setup = apply_worker_options(im.worker, p.worker_cpus, p.worker_priority);
  } catch (...) {  // std::bad_alloc while building the message: the options are applied or not, carry on
  }
}

const std::string& RealTimeController::worker_setup() const { return impl_->worker_setup; }

RealTimeController::~RealTimeController() {
  try {
    close();
  } catch (...) {  // join cannot fail for a joinable thread of this object; never throw from a destructor
  }
}

void RealTimeController::step(const std::vector<ConstFloatSpan>& observations, FloatSpan action) {
  impl_->step(observations, action);
}

void RealTimeController::step(const float* observation, float* action) {
  Impl& im = *impl_;
  if (im.step_sizes.size() != 1)
    throw InputError("RealTimeController::step(const float*, float*) is for a bundle with one observation input; "
                     "this one has " + std::to_string(im.step_sizes.size()) + " (use the span overload)");
  im.one_obs[0] = {observation, observation ? static_cast<std::size_t>(im.B) * im.step_sizes[0] : 0};
  im.step(im.one_obs, {action, action ? static_cast<std::size_t>(im.B) * im.A : 0});
}

bool RealTimeController::switched() const { return impl_->switched; }
int RealTimeController::expected_delay() const { return impl_->expected_delay(); }

ControllerStats RealTimeController::stats() const {
  const Impl& im = *impl_;
  ControllerStats s = im.st;
  const std::size_t cap = im.latencies.size(), n = std::min(im.latency_count, cap);
  s.latencies_s.reserve(n);
  for (std::size_t i = im.latency_count - n; i < im.latency_count; ++i) s.latencies_s.push_back(im.latencies[i % cap]);
  return s;
}

void RealTimeController::close() { impl_->close(); }

}  // namespace dpkit
