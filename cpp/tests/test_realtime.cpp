// dpkit::RealTimeController on the random low-dim test bundle: the schedule on a virtual clock (fixed
// delay), its chunks against the Policy sampled directly, the measured delay with an injected clock, and
// every bad setting, a worker failure, close and destruction. The same schedule is compared tick by tick
// with the Python reference in tests/test_cpp_realtime.py.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dpkit/runtime.hpp"

namespace {

const std::string kLowdim = std::string(DPKIT_TEST_BUNDLES) + "/lowdim";

dpkit::PolicyParams params(int max_batch = 2) {
  dpkit::PolicyParams p;
  p.ort_library = DPKIT_TEST_ORT_LIBRARY;
  p.intra_op_threads = 1;
  p.allow_spinning = false;
  p.max_batch = max_batch;
  return p;
}

// Observation of tick n for batch b: (b, *shape), a smooth function of n so chunks differ.
std::vector<float> obs_at(const dpkit::PolicyInfo& info, int b, int n) {
  std::vector<float> o(static_cast<std::size_t>(b) * info.observations[0].step_size);
  for (std::size_t i = 0; i < o.size(); ++i) o[i] = 200.0f + 50.0f * std::sin(0.1f * n + 0.3f * static_cast<float>(i));
  return o;
}

struct Trace {
  std::vector<std::vector<float>> actions;  // per tick, (B, A)
  std::vector<bool> switched;
  dpkit::ControllerStats stats;
};

Trace drive(dpkit::Policy& policy, dpkit::ControllerParams cp, int ticks) {
  const auto& info = policy.info();
  dpkit::RealTimeController ctl(policy, cp);
  Trace r;
  for (int n = 0; n < ticks; ++n) {
    std::vector<float> a(static_cast<std::size_t>(cp.batch) * info.action_dim);
    const auto o = obs_at(info, cp.batch, n);
    ctl.step(o.data(), a.data());
    r.actions.push_back(a);
    r.switched.push_back(ctl.switched());
  }
  r.stats = ctl.stats();
  return r;
}

dpkit::ControllerParams controller(dpkit::Execution e, int delay, int batch = 1) {
  dpkit::ControllerParams cp;
  cp.execution = e;
  cp.delay = delay;
  cp.batch = batch;
  cp.seed = 7;
  return cp;
}

#define EXPECT_THROW_MSG(stmt, type, text)                                              \
  try {                                                                                 \
    stmt;                                                                               \
    ADD_FAILURE() << "no exception from " #stmt;                                        \
  } catch (const type& e) {                                                             \
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();         \
  }

}  // namespace

TEST(RealTime, AsyncSwitchesOnScheduleWithoutMisses) {
  dpkit::Policy policy(kLowdim, params());
  const int ta = policy.info().n_action_steps;
  for (auto e : {dpkit::Execution::async, dpkit::Execution::async_inpaint}) {
    for (int d : {0, 1, 2, 3}) {
      const Trace r = drive(policy, controller(e, d, 2), 40);
      EXPECT_EQ(r.stats.ticks, 40);
      EXPECT_EQ(r.stats.deadline_misses, 0) << "d=" << d;
      EXPECT_EQ(r.stats.wait_ticks, 0);
      EXPECT_EQ(static_cast<std::size_t>(r.stats.chunks), r.stats.latencies_s.size());
      EXPECT_LE(r.stats.requests - r.stats.chunks, 1);
      // Requested with d (+ margin 0) actions left, switched in d ticks later: a chunk every Ta - d ticks.
      std::vector<int> at;
      for (int n = 0; n < 40; ++n)
        if (r.switched[n]) at.push_back(n);
      ASSERT_GE(at.size(), 2u);
      EXPECT_EQ(at[0], 0);
      // The first chunk runs out whole (requested d before its end, switched in at index d); then every
      // Ta - d ticks.
      EXPECT_EQ(at[1], ta) << "d=" << d;
      for (std::size_t i = 2; i < at.size(); ++i) EXPECT_EQ(at[i] - at[i - 1], d == 0 ? ta : ta - d) << "d=" << d;
    }
  }
}

TEST(RealTime, SameSeedSameActionsAndSeedMatters) {
  dpkit::Policy policy(kLowdim, params());
  const auto cp = controller(dpkit::Execution::async_inpaint, 2);
  const Trace a = drive(policy, cp, 30), b = drive(policy, cp, 30);
  EXPECT_EQ(a.actions, b.actions);
  auto other = cp;
  other.seed = 8;
  EXPECT_NE(drive(policy, other, 30).actions, a.actions);
}

TEST(RealTime, SyncChunksAreThePolicysOwnSamples) {
  dpkit::Policy policy(kLowdim, params()), direct(kLowdim, params());
  const auto& info = policy.info();
  const int ta = info.n_action_steps, d = 2, A = info.action_dim, To = info.n_obs_steps;
  const auto cp = controller(dpkit::Execution::sync, d);
  const Trace r = drive(policy, cp, 2 * ta + d);
  EXPECT_EQ(r.stats.wait_ticks, d);
  EXPECT_EQ(r.stats.deadline_misses, 0);
  // Chunk 0 from tick 0's observation repeated To times; chunk 1 requested at tick Ta (history Ta-To+1..Ta),
  // executed from its first action at tick Ta + d; the last action of chunk 0 is held in between.
  for (int c = 0; c < 2; ++c) {
    const int tick = c * ta;
    std::vector<float> hist;
    for (int t = tick - To + 1; t <= tick; ++t) {
      const auto o = obs_at(info, 1, std::max(t, 0));
      hist.insert(hist.end(), o.begin(), o.end());
    }
    dpkit::SampleRequest req;
    req.sampler = direct.default_sampler();
    req.observations = {{hist.data(), hist.size()}};
    std::vector<float> actions(info.actions_size(1));
    dpkit::SampleOutput out;
    out.actions = {actions.data(), actions.size()};
    direct.reseed(dpkit::RealTimeController::request_seed(cp.seed, static_cast<std::uint64_t>(c)));
    direct.sample(req, out);
    const int first_tick = c == 0 ? 0 : ta + d;
    for (int i = 0; i < ta; ++i)
      for (int k = 0; k < A; ++k) EXPECT_EQ(r.actions[first_tick + i][k], actions[i * A + k]) << "chunk " << c;
  }
  for (int n = ta; n < ta + d; ++n) EXPECT_EQ(r.actions[n], r.actions[ta - 1]);  // held
}

TEST(RealTime, InpaintingChangesTheContinuationNotTheSchedule) {
  dpkit::Policy policy(kLowdim, params());
  auto cp = controller(dpkit::Execution::async, 2);
  const Trace plain = drive(policy, cp, 30);
  cp.execution = dpkit::Execution::async_inpaint;
  cp.blend = 3;
  const Trace inpainted = drive(policy, cp, 30);
  EXPECT_EQ(plain.switched, inpainted.switched);
  const int ta = policy.info().n_action_steps;
  for (int n = 0; n < ta; ++n) EXPECT_EQ(plain.actions[n], inpainted.actions[n]);  // chunk 0: no prefix
  EXPECT_NE(plain.actions, inpainted.actions);
}

TEST(RealTime, ADelayBeyondTheChunkMissesDeadlines) {
  dpkit::Policy policy(kLowdim, params());
  const Trace r = drive(policy, controller(dpkit::Execution::async, 6), 40);
  EXPECT_GT(r.stats.deadline_misses, 0);
  EXPECT_EQ(r.stats.wait_ticks, 0);
}

TEST(RealTime, MeasuredDelayFromTheInjectedClock) {
  dpkit::Policy policy(kLowdim, params());
  // Only the worker reads the clock, twice per chunk: each chunk "takes" exactly 0.25 s = 3 ticks of 0.1 s.
  auto t = std::make_shared<std::atomic<int>>(0);
  dpkit::ControllerParams cp = controller(dpkit::Execution::async, -1);
  cp.clock = [t] { return 0.25 * t->fetch_add(1); };
  dpkit::RealTimeController ctl(policy, cp);
  EXPECT_EQ(ctl.expected_delay(), 1);  // before any chunk
  const auto o = obs_at(policy.info(), 1, 0);
  std::vector<float> a(2);
  // 30 ticks, and more while the worker has not finished two chunks (a loaded or sanitized build can be slower
  // than 30 x 2 ms a chunk; the injected clock keeps every measured latency at 0.25 s whatever the wall time)
  for (int n = 0; n < 30 || (ctl.stats().chunks < 2 && n < 5000); ++n) {
    ctl.step(o.data(), a.data());
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(ctl.expected_delay(), 3);
  const auto s = ctl.stats();
  EXPECT_GE(s.chunks, 2);
  for (double l : s.latencies_s) EXPECT_DOUBLE_EQ(l, 0.25);
}

TEST(RealTime, BadSettingsAreInputErrors) {
  dpkit::Policy policy(kLowdim, params()), other(kLowdim, params());
  auto bad = [&](auto edit, const char* text) {
    dpkit::ControllerParams cp;
    edit(cp);
    EXPECT_THROW_MSG({ dpkit::RealTimeController ctl(policy, cp); }, dpkit::InputError, text);
  };
  bad([](auto& c) { c.delay = -2; }, "ControllerParams::delay must be in [-1, 8]");
  bad([](auto& c) { c.delay = 9; }, "ControllerParams::delay must be in [-1, 8]");
  bad([](auto& c) { c.margin = -1; }, "ControllerParams::margin");
  bad([](auto& c) { c.blend = -1; }, "ControllerParams::blend");
  bad([](auto& c) { c.batch = 0; }, "ControllerParams::batch must be in [1, 2]");
  bad([](auto& c) { c.batch = 3; }, "ControllerParams::batch must be in [1, 2]");
  bad([](auto& c) { c.period = 0; }, "ControllerParams::period");
  bad([](auto& c) { c.period = std::nan(""); }, "ControllerParams::period");
  bad([](auto& c) { c.history = 0; }, "ControllerParams::history");
  bad([](auto& c) { c.execution = static_cast<dpkit::Execution>(7); }, "ControllerParams::execution");
  const dpkit::Sampler foreign = other.default_sampler();
  bad([&](auto& c) { c.sampler = foreign; }, "was made by another Policy");
}

TEST(RealTime, BadStepsAreInputErrorsAndCloseIsFinal) {
  dpkit::Policy policy(kLowdim, params());
  dpkit::RealTimeController ctl(policy, controller(dpkit::Execution::async_inpaint, 1, 2));
  auto o = obs_at(policy.info(), 2, 0);
  std::vector<float> a(4);
  EXPECT_THROW_MSG(ctl.step({{o.data(), o.size() - 1}}, {a.data(), a.size()}), dpkit::InputError, "floats, got");
  EXPECT_THROW_MSG(ctl.step({}, {a.data(), a.size()}), dpkit::InputError, "expected 1 observation arrays");
  EXPECT_THROW_MSG(ctl.step({{o.data(), o.size()}}, {a.data(), 2}), dpkit::InputError, "action output");
  o[3] = std::nanf("");
  EXPECT_THROW_MSG(ctl.step(o.data(), a.data()), dpkit::InputError, "NaN or Inf");
  o[3] = 1.0f;
  ctl.step(o.data(), a.data());  // the bad calls changed nothing
  EXPECT_EQ(ctl.stats().ticks, 1);
  ctl.close();
  ctl.close();
  EXPECT_THROW_MSG(ctl.step(o.data(), a.data()), dpkit::InputError, "closed");
}

TEST(RealTime, WorkerFailureReachesTheCaller) {
  dpkit::Policy policy(kLowdim, params());
  dpkit::RealTimeController ctl(policy, controller(dpkit::Execution::async, 2));
  dpkit::Policy thief = std::move(policy);  // the worker's Policy is now moved-from: its sample throws
  const auto o = obs_at(thief.info(), 1, 0);
  std::vector<float> a(2);
  EXPECT_THROW_MSG(ctl.step(o.data(), a.data()), dpkit::Error, "sampling a chunk failed: dpkit::Policy used after it was moved from");
  EXPECT_THROW_MSG(ctl.step(o.data(), a.data()), dpkit::Error, "sampling a chunk failed");  // every time, never a hang
}

TEST(RealTime, DestructionWithAChunkInFlightJoins) {
  dpkit::Policy policy(kLowdim, params());
  const auto o = obs_at(policy.info(), 1, 0);
  std::vector<float> a(2);
  for (int ticks : {1, 5, 7}) {  // destroyed right after requesting (async, wall clock: still pending)
    dpkit::RealTimeController ctl(policy, controller(dpkit::Execution::async, -1));
    for (int n = 0; n < ticks; ++n) ctl.step(o.data(), a.data());
  }
  dpkit::ControllerParams cp = controller(dpkit::Execution::sync, 3);
  dpkit::RealTimeController ctl(policy, cp);
  for (int n = 0; n < 9; ++n) ctl.step(o.data(), a.data());  // tick 8 requested the next chunk: pending
  ctl.close();
  EXPECT_EQ(ctl.stats().requests, 2);
}

TEST(RealTime, LatencyPercentilesInterpolateLikeNumpy) {
  dpkit::ControllerStats s;
  EXPECT_EQ(s.latency_percentile(50), 0.0);
  s.latencies_s = {4, 1, 3, 2};
  EXPECT_DOUBLE_EQ(s.latency_percentile(50), 2.5);
  EXPECT_DOUBLE_EQ(s.latency_percentile(90), 3.7);
  EXPECT_DOUBLE_EQ(s.latency_percentile(100), 4);
  EXPECT_DOUBLE_EQ(s.latency_percentile(0), 1);
}

TEST(RealTime, RequestSeedsDiffer) {
  using C = dpkit::RealTimeController;
  EXPECT_NE(C::request_seed(0, 0), C::request_seed(0, 1));
  EXPECT_NE(C::request_seed(0, 1), C::request_seed(1, 0));
  EXPECT_EQ(C::request_seed(5, 9), C::request_seed(5, 9));
}
