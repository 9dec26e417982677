// Example: a receding-horizon controller embedding dpkit the way a robot controller would.
//
//   dpkit_controller BUNDLE STREAM [--sampler ddpm|ddim] [--steps K] [--threads 1] [--seed 0]
//                    [--fast] [--max-chunks N] [--dump actions.f32] [--ort-library PATH]
//
// STREAM is a recorded observation stream (cpp/examples/record_observations.py). Per episode the
// controller keeps the last To observations (the first one repeated at the start, as in training),
// and every Ta control ticks asks the policy for a chunk and executes its Ta actions, one per tick at
// the stream's control rate (10 Hz). It reports per-chunk latency p50/p99/max and deadline misses (a
// chunk not ready within one control period). --fast skips the sleeps (same latencies, no pacing).
// --dump writes every executed action as float32 (chunks, Ta, A) for comparison with Python. Without
// --sampler / --steps it uses the bundle's default sampler (Policy::find_sampler's rule).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "dpkit/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Stream {
  std::vector<std::string> names;
  std::vector<std::size_t> step_sizes;  // floats per step, per input
  std::vector<int> episodes;            // steps per episode
  double control_hz = 10.0;
  std::vector<float> data;              // step-major: all inputs of step 0, then step 1, ...
  std::size_t step_floats = 0;
};

Stream read_stream(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::string line;
  std::getline(f, line);
  const nlohmann::json h = nlohmann::json::parse(line, nullptr, false);
  if (h.is_discarded() || h.value("format", "") != "dpkit-obs-stream" || h.value("version", 0) != 1)
    throw std::runtime_error(path + ": not a dpkit-obs-stream version 1 file");
  Stream s;
  for (const auto& in : h.at("inputs")) {
    std::size_t n = 1;
    for (int d : in.at("shape")) n *= static_cast<std::size_t>(d);
    s.names.push_back(in.at("name"));
    s.step_sizes.push_back(n);
    s.step_floats += n;
  }
  s.episodes = h.at("episodes").get<std::vector<int>>();
  s.control_hz = h.value("control_hz", 10.0);
  std::size_t steps = 0;
  for (int e : s.episodes) steps += static_cast<std::size_t>(e);
  s.data.resize(steps * s.step_floats);
  f.read(reinterpret_cast<char*>(s.data.data()), static_cast<std::streamsize>(s.data.size() * sizeof(float)));
  if (static_cast<std::size_t>(f.gcount()) != s.data.size() * sizeof(float))
    throw std::runtime_error(path + ": truncated (header promises " + std::to_string(steps) + " steps)");
  return s;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

int run(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: dpkit_controller BUNDLE STREAM [--sampler ddpm|ddim] [--steps K] [--threads 1] [--seed 0]\n"
                 "                        [--fast] [--max-chunks N] [--dump FILE] [--ort-library PATH]\n";
    return 2;
  }
  const std::string bundle = argv[1], stream_path = argv[2];
  std::string sampler, dump;  // "" and 0: the bundle's default sampler
  int steps = 0, max_chunks = -1;
  bool fast = false;
  dpkit::PolicyParams params;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--sampler") sampler = next();
    else if (a == "--steps") steps = std::stoi(next());
    else if (a == "--threads") params.intra_op_threads = std::stoi(next());
    else if (a == "--seed") params.seed = std::stoull(next());
    else if (a == "--max-chunks") max_chunks = std::stoi(next());
    else if (a == "--dump") dump = next();
    else if (a == "--ort-library") params.ort_library = next();
    else if (a == "--fast") fast = true;
    else throw std::runtime_error("unknown option " + a);
  }

  const Stream s = read_stream(stream_path);
  dpkit::Policy policy(bundle, params);
  const dpkit::PolicyInfo& info = policy.info();
  if (s.names.size() != info.observations.size())
    throw std::runtime_error("the stream has " + std::to_string(s.names.size()) + " inputs, the bundle wants " +
                             std::to_string(info.observations.size()));
  for (std::size_t i = 0; i < s.names.size(); ++i)
    if (s.names[i] != info.observations[i].name || s.step_sizes[i] != info.observations[i].step_size)
      throw std::runtime_error("stream input " + s.names[i] + " does not match the bundle's " + info.observations[i].name);

  const int To = info.n_obs_steps, Ta = info.n_action_steps, A = info.action_dim;
  // Everything the loop touches is allocated here, before the first tick.
  dpkit::SampleRequest req;
  req.sampler = policy.find_sampler(sampler, steps);
  std::printf("bundle %s (%s, To=%d H=%d Ta=%d), ONNX Runtime %s, %s, %d threads\n", bundle.c_str(),
              info.obs_mode.c_str(), To, info.horizon, Ta, info.ort_version.c_str(), req.sampler.name().c_str(),
              params.intra_op_threads);
  std::vector<std::vector<float>> window(s.names.size());
  for (std::size_t i = 0; i < window.size(); ++i) {
    window[i].resize(info.observation_size(i));
    req.observations.push_back({window[i].data(), window[i].size()});
  }
  std::vector<float> chunk(info.actions_size());
  dpkit::SampleOutput out;
  out.actions = {chunk.data(), chunk.size()};
  std::vector<double> latencies_ms;
  std::vector<float> executed;
  const auto period = std::chrono::duration<double>(1.0 / s.control_hz);
  int misses = 0, chunks = 0;

  std::size_t episode_start = 0;
  for (std::size_t e = 0; e < s.episodes.size() && (max_chunks < 0 || chunks < max_chunks); ++e) {
    const int T = s.episodes[e];
    auto tick = Clock::now();
    for (int t = 0; t < T && (max_chunks < 0 || chunks < max_chunks); t += Ta) {
      // History of the last To observations ending at t (before the episode: its first observation).
      for (int j = 0; j < To; ++j) {
        const std::size_t step = episode_start + static_cast<std::size_t>(std::max(0, t - To + 1 + j));
        const float* src = s.data.data() + step * s.step_floats;
        for (std::size_t i = 0; i < window.size(); ++i) {
          std::memcpy(window[i].data() + static_cast<std::size_t>(j) * s.step_sizes[i], src, s.step_sizes[i] * sizeof(float));
          src += s.step_sizes[i];
        }
      }
      const auto t0 = Clock::now();
      policy.sample(req, out);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      latencies_ms.push_back(ms);
      if (ms > std::chrono::duration<double, std::milli>(period).count()) ++misses;
      ++chunks;
      if (!dump.empty()) executed.insert(executed.end(), chunk.begin(), chunk.end());
      // Execute the Ta actions, one per control tick (a real controller would send chunk[k] to the robot).
      for (int k = 0; k < Ta && t + k < T; ++k) {
        tick += std::chrono::duration_cast<Clock::duration>(period);
        if (!fast) std::this_thread::sleep_until(tick);
      }
    }
    episode_start += static_cast<std::size_t>(T);
  }

  std::printf("%d chunks over %zu episodes at %.0f Hz\n", chunks, s.episodes.size(), s.control_hz);
  std::printf("latency per chunk [ms]: p50 %.3f  p99 %.3f  max %.3f   deadline (%.0f ms) misses: %d\n",
              percentile(latencies_ms, 0.5), percentile(latencies_ms, 0.99),
              latencies_ms.empty() ? 0.0 : *std::max_element(latencies_ms.begin(), latencies_ms.end()),
              1000.0 / s.control_hz, misses);
  if (!dump.empty()) {
    std::ofstream f(dump, std::ios::binary);
    f.write(reinterpret_cast<const char*>(executed.data()), static_cast<std::streamsize>(executed.size() * sizeof(float)));
    if (!f) throw std::runtime_error("cannot write " + dump);
    std::printf("wrote %d chunks x %d actions x %d to %s\n", chunks, Ta, A, dump.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
