// Example: the real-time controller at a fixed wall-clock rate -- one action per tick, the next chunk
// sampled on the controller's worker thread meanwhile.
//
//   dpkit_realtime BUNDLE [--execution sync|async|async-inpaint] [--ticks 1000] [--period 0.1]
//                  [--delay -1] [--margin 0] [--blend 0] [--sampler ddim] [--steps 10] [--threads 1]
//                  [--seed 0] [--ort-library PATH] [--worker-cpus 1[,2]] [--worker-priority 0..99]
//
// Observations are a synthetic smooth signal (this measures timing, not behaviour). Each tick calls
// RealTimeController::step and sleeps until the next tick (steady clock). At the end it prints the
// controller's counters (deadline misses: ticks with no action ready in the async modes), the chunk
// latency distribution, and how long `step` itself took (the control thread's cost per tick).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "dpkit/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double q) {
  dpkit::ControllerStats s;
  s.latencies_s = std::move(v);
  return s.latency_percentile(q);
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]).rfind("--", 0) == 0) {
    std::cerr << "usage: dpkit_realtime BUNDLE [--execution sync|async|async-inpaint] [--ticks 1000] [--period 0.1]\n"
                 "                      [--delay -1] [--margin 0] [--blend 0] [--sampler ddim] [--steps 10]\n"
                 "                      [--threads 1] [--seed 0] [--ort-library PATH] [--worker-cpus 1[,2]]\n"
                 "                      [--worker-priority 0..99]\n";
    return 2;
  }
  const std::string bundle = argv[1];
  std::string execution = "async-inpaint", sampler, ort_library;
  int ticks = 1000, steps = 0, threads = 1;
  dpkit::ControllerParams cp;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) throw dpkit::InputError("option " + a + " needs a value");
    const std::string v = argv[++i];
    if (a == "--execution") execution = v;
    else if (a == "--ticks") ticks = std::stoi(v);
    else if (a == "--period") cp.period = std::stod(v);
    else if (a == "--delay") cp.delay = std::stoi(v);
    else if (a == "--margin") cp.margin = std::stoi(v);
    else if (a == "--blend") cp.blend = std::stoi(v);
    else if (a == "--sampler") sampler = v;
    else if (a == "--steps") steps = std::stoi(v);
    else if (a == "--threads") threads = std::stoi(v);
    else if (a == "--seed") cp.seed = std::stoull(v);
    else if (a == "--ort-library") ort_library = v;
    else if (a == "--worker-priority") cp.worker_priority = std::stoi(v);  // SCHED_FIFO where permitted
    else if (a == "--worker-cpus")
      for (std::size_t at = 0; at < v.size();) {  // "1" or "1,2"
        const std::size_t comma = std::min(v.find(',', at), v.size());
        cp.worker_cpus.push_back(std::stoi(v.substr(at, comma - at)));
        at = comma + 1;
      }
    else throw dpkit::InputError("unknown option " + a);
  }
  if (execution == "sync") cp.execution = dpkit::Execution::sync;
  else if (execution == "async") cp.execution = dpkit::Execution::async;
  else if (execution == "async-inpaint") cp.execution = dpkit::Execution::async_inpaint;
  else throw dpkit::InputError("--execution must be sync, async or async-inpaint, got " + execution);
  if (ticks < 1) throw dpkit::InputError("--ticks must be >= 1");

  dpkit::PolicyParams pp;
  pp.intra_op_threads = threads;
  pp.ort_library = ort_library;
  dpkit::Policy policy(bundle, pp);
  const dpkit::PolicyInfo& info = policy.info();
  cp.sampler = policy.find_sampler(sampler, steps);
  dpkit::RealTimeController ctl(policy, cp);  // the worker thread owns `policy` from here on
  if (!ctl.worker_setup().empty()) std::printf("%s\n", ctl.worker_setup().c_str());  // applied, or why not

  std::vector<std::vector<float>> obs;
  std::vector<dpkit::ConstFloatSpan> spans;
  for (const auto& o : info.observations) obs.emplace_back(o.step_size, 0.0f);
  for (const auto& o : obs) spans.push_back({o.data(), o.size()});
  std::vector<float> action(static_cast<std::size_t>(info.action_dim));
  std::vector<double> step_ms;
  step_ms.reserve(static_cast<std::size_t>(ticks));
  int overruns = 0;

  std::printf("%s: %s, sampler %s, %d ticks at %.0f Hz, %d ORT threads, delay %s\n", bundle.c_str(),
              execution.c_str(), cp.sampler.name().c_str(), ticks, 1.0 / cp.period, threads,
              cp.delay < 0 ? "measured" : std::to_string(cp.delay).c_str());
  const auto period = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cp.period));
  auto next = Clock::now();
  for (int n = 0; n < ticks; ++n) {
    for (auto& o : obs)  // a smooth synthetic signal in a plausible range
      for (std::size_t i = 0; i < o.size(); ++i) o[i] = 256.0f + 100.0f * std::sin(0.05f * n + 0.7f * static_cast<float>(i));
    const auto t0 = Clock::now();
    ctl.step(spans, {action.data(), action.size()});
    const auto t1 = Clock::now();
    step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    next += period;
    if (t1 > next) {  // the tick ran past its slot (only start-up should): restart the schedule from now
      ++overruns;
      next = t1;
    }
    std::this_thread::sleep_until(next);
  }
  const dpkit::ControllerStats s = ctl.stats();
  ctl.close();
  const std::vector<double> after_startup(step_ms.begin() + 1, step_ms.end());
  std::printf("ticks %lld  requests %lld  chunks %lld  deadline misses %lld  wait ticks %lld  expected delay %d ticks\n",
              static_cast<long long>(s.ticks), static_cast<long long>(s.requests), static_cast<long long>(s.chunks),
              static_cast<long long>(s.deadline_misses), static_cast<long long>(s.wait_ticks), ctl.expected_delay());
  std::printf("chunk latency ms: p50 %.1f  p90 %.1f  p99 %.1f  max %.1f  (%zu chunks)\n", 1e3 * s.latency_percentile(50),
              1e3 * s.latency_percentile(90), 1e3 * s.latency_percentile(99), 1e3 * s.latency_percentile(100),
              s.latencies_s.size());
  std::printf("step() ms after start-up: p50 %.3f  p99 %.3f  max %.3f; start-up (first chunk) %.1f; overran ticks %d\n",
              percentile(after_startup, 50), percentile(after_startup, 99), percentile(after_startup, 100), step_ms[0],
              overruns);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // dpkit::Error and bad numbers in options (std::stoi)
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
