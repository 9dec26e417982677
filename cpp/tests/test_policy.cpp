// dpkit::Policy end to end on the generated random bundles: results, determinism, batching, threads,
// and every bad input or bad bundle raising a dpkit::Error that names it.
#include <dlfcn.h>
#include <execinfo.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <new>
#include <random>
#include <thread>

#include "dpkit/runtime.hpp"
#include "internal.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kLowdim = std::string(DPKIT_TEST_BUNDLES) + "/lowdim";
const std::string kImage = std::string(DPKIT_TEST_BUNDLES) + "/image";

dpkit::PolicyParams params(int max_batch = 1, std::uint64_t seed = 0) {
  dpkit::PolicyParams p;
  p.ort_library = DPKIT_TEST_ORT_LIBRARY;
  p.intra_op_threads = 1;
  p.allow_spinning = false;  // tests share 2 cores with other work
  p.max_batch = max_batch;
  p.seed = seed;
  return p;
}

std::vector<float> randn(std::size_t n, unsigned seed, float scale = 1.0f, float offset = 0.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(g) * scale + offset;
  return v;
}

// Observations for batch b, realistic magnitudes (pixels around 256).
std::vector<std::vector<float>> observations(const dpkit::PolicyInfo& info, int b, unsigned seed) {
  std::vector<std::vector<float>> obs;
  for (std::size_t i = 0; i < info.observations.size(); ++i)
    obs.push_back(info.observations[i].name == "image" ? randn(info.observation_size(i, b), seed + 7u, 0.2f, 0.5f)
                                                       : randn(info.observation_size(i, b), seed + 11u, 100.0f, 256.0f));
  return obs;
}

struct Result {
  std::vector<float> traj, actions;
};

// Both outputs of one sample() call for a prepared request.
Result run_request(dpkit::Policy& p, const dpkit::SampleRequest& req) {
  Result r;
  r.traj.resize(p.info().trajectory_size(req.batch));
  r.actions.resize(p.info().actions_size(req.batch));
  dpkit::SampleOutput out{{r.traj.data(), r.traj.size()}, {r.actions.data(), r.actions.size()}};
  p.sample(req, out);
  return r;
}

Result run(dpkit::Policy& p, const std::vector<std::vector<float>>& obs, int b, dpkit::Sampler sampler = {},
           const std::vector<float>* init = nullptr, const std::vector<float>* steps = nullptr) {
  dpkit::SampleRequest req;
  req.batch = b;
  req.sampler = sampler ? sampler : p.default_sampler();
  for (const auto& o : obs) req.observations.push_back({o.data(), o.size()});
  if (init) req.initial_noise = {init->data(), init->size()};
  if (steps) req.step_noise = {steps->data(), steps->size()};
  return run_request(p, req);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dpkit::Error& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_MSG(msg, needle) EXPECT_NE((msg).find(needle), std::string::npos) << "message: " << (msg)

// A writable copy of a bundle, for corrupting.
std::string copy_bundle(const std::string& src, const std::string& name) {
  const fs::path dst = fs::path(testing::TempDir()) / ("dpkit_" + name);
  fs::remove_all(dst);
  fs::copy(src, dst, fs::copy_options::recursive);
  return dst.string();
}

json read_json(const std::string& path) { return json::parse(std::ifstream(path)); }
void write_json(const std::string& path, const json& j) { std::ofstream(path) << j.dump(2); }

}  // namespace

TEST(Policy, LoadsLowdimAndReportsInfo) {
  dpkit::Policy p(kLowdim, params());
  const auto& info = p.info();
  EXPECT_EQ(info.obs_mode, "lowdim");
  EXPECT_EQ(info.horizon, 16);
  EXPECT_EQ(info.n_action_steps, 8);
  EXPECT_EQ(info.action_dim, 2);
  EXPECT_EQ(info.samplers.size(), 4u);
  EXPECT_EQ(info.default_sampler, "ddim-10");
  EXPECT_EQ(p.default_sampler().name(), "ddim-10");
  EXPECT_FALSE(info.ort_version.empty());
  EXPECT_EQ(dpkit::ort_version(), info.ort_version);
  const dpkit::Sampler ddpm100 = p.find_sampler("ddpm", 100);
  EXPECT_EQ(ddpm100.name(), "ddpm-100");
  EXPECT_EQ(ddpm100.sampler(), "ddpm");
  EXPECT_EQ(ddpm100.num_inference_steps(), 100);
  EXPECT_TRUE(ddpm100.uses_step_noise());
  EXPECT_EQ(info.step_noise_size(ddpm100, 2), 100u * 2 * 16 * 2);
  EXPECT_EQ(p.find_sampler("ddim", 10).name(), "ddim-10");
  EXPECT_FALSE(p.find_sampler("ddim", 10).uses_step_noise());
  EXPECT_EQ(p.find_sampler("ddim", 0).name(), "ddim-10");  // K <= 0: the default sampler, being a DDIM one
  EXPECT_EQ(p.find_sampler("ddpm", 0).name(), "ddpm-100");  // ... else the kind's largest K (not ddpm-10)
  EXPECT_EQ(p.find_sampler("", 100).name(), "ddim-100");   // no kind: the default sampler's kind
  EXPECT_EQ(p.find_sampler().name(), "ddim-10");
  for (const auto& s : info.samplers) EXPECT_EQ(s.uses_step_noise, s.sampler == "ddpm") << s.name;
  EXPECT_MSG(error_of([&] { p.find_sampler("euler", 10); }), "unknown sampler \"euler\" (expected ddpm, ddim or fewstep)");
  EXPECT_MSG(error_of([&] { info.observation_size(1); }), "observation index 1 is out of range");
  EXPECT_MSG(error_of([&] { info.step_noise_size(dpkit::Sampler()); }), "the Sampler is empty");
}

TEST(Policy, FindSamplerDoesNotDependOnListOrder) {
  // dpkit-export lists DDIM step counts in ascending order (ddim-1 first): K <= 0 must still give the
  // default sampler, as the Python backends do.
  const std::string dir = copy_bundle(kLowdim, "order");
  json m = read_json(dir + "/policy.json");
  auto& list = m["scheduler"]["samplers"];
  std::reverse(list.begin(), list.end());  // ddim-100, ddim-10, ddpm-10, ddpm-100
  write_json(dir + "/policy.json", m);
  dpkit::Policy p(dir, params());
  EXPECT_EQ(p.find_sampler("ddim", 0).name(), "ddim-10");
  EXPECT_EQ(p.find_sampler("ddpm", 0).name(), "ddpm-100");
  EXPECT_EQ(p.default_sampler().name(), "ddim-10");
}

TEST(Policy, LastTimingAccountsForTheCall) {
  dpkit::Policy p(kLowdim, params());
  EXPECT_EQ(p.last_timing().steps, 0);
  const auto obs = observations(p.info(), 1, 1);
  run(p, obs, 1, p.find_sampler("ddpm", 10));
  const dpkit::SampleTiming t = p.last_timing();
  EXPECT_EQ(t.steps, 10);
  EXPECT_GT(t.encoder_ms, 0.0);
  EXPECT_GT(t.denoiser_ms, 0.0);
  EXPECT_GE(t.loop_ms(), 0.0);
  EXPECT_LE(t.encoder_ms + t.denoiser_ms, t.total_ms);
  // A failed call leaves the last good timing in place.
  dpkit::SampleRequest bad;
  bad.batch = 5;
  dpkit::SampleOutput none;
  error_of([&] { p.sample(bad, none); });
  EXPECT_EQ(p.last_timing().steps, 10);
}

TEST(Policy, InjectedNoiseDeterminesTheResult) {
  dpkit::Policy p(kLowdim, params());
  const auto obs = observations(p.info(), 1, 1);
  const dpkit::Sampler ddpm = p.find_sampler("ddpm", 10), ddim = p.find_sampler("ddim", 10);
  const auto init = randn(p.info().trajectory_size(), 3), steps = randn(p.info().step_noise_size(ddpm), 4);
  const auto steps2 = randn(p.info().step_noise_size(ddpm), 5);
  const Result a = run(p, obs, 1, ddpm, &init, &steps), b = run(p, obs, 1, ddpm, &init, &steps);
  EXPECT_EQ(max_abs_diff(a.traj, b.traj), 0.0f);
  EXPECT_GT(max_abs_diff(a.traj, run(p, obs, 1, ddpm, &init, &steps2).traj), 1e-4f);  // DDPM uses step noise
  const Result c = run(p, obs, 1, ddim, &init, &steps), d = run(p, obs, 1, ddim, &init, &steps2);
  EXPECT_EQ(max_abs_diff(c.traj, d.traj), 0.0f);  // DDIM (eta = 0) does not
  for (float v : c.traj) EXPECT_TRUE(std::isfinite(v));
  // Different observations give a different trajectory (the condition reaches the denoiser).
  EXPECT_GT(max_abs_diff(c.traj, run(p, observations(p.info(), 1, 9), 1, ddim, &init).traj), 1e-4f);
}

TEST(Policy, SeededGeneratorRepeats) {
  dpkit::Policy p(kLowdim, params(1, 42)), q(kLowdim, params(1, 42));
  const auto obs = observations(p.info(), 1, 1);
  const Result a = run(p, obs, 1, p.find_sampler("ddpm", 100)), b = run(q, obs, 1, q.find_sampler("ddpm", 100));
  const dpkit::Sampler ddpm = p.find_sampler("ddpm", 100);
  EXPECT_EQ(max_abs_diff(a.traj, b.traj), 0.0f);
  const Result a2 = run(p, obs, 1, ddpm);
  EXPECT_GT(max_abs_diff(a.traj, a2.traj), 1e-4f);  // the stream moves on
  p.reseed(42);
  EXPECT_EQ(max_abs_diff(run(p, obs, 1, ddpm).traj, a.traj), 0.0f);
}

TEST(Policy, ActionsAreTheUnnormalizedSlice) {
  dpkit::Policy p(kLowdim, params(3));
  const auto& info = p.info();
  const json m = read_json(kLowdim + "/policy.json");
  ASSERT_EQ(info.action_scale.size(), 2u);
  for (int a = 0; a < info.action_dim; ++a) {
    EXPECT_EQ(info.action_scale[a], m["action_normalizer"]["scale"][a].get<float>());
    EXPECT_EQ(info.action_offset[a], m["action_normalizer"]["offset"][a].get<float>());
  }
  const Result r = run(p, observations(info, 3, 2), 3);
  for (int b = 0; b < 3; ++b)
    for (int j = 0; j < info.n_action_steps; ++j)
      for (int a = 0; a < info.action_dim; ++a) {
        const float t = r.traj[(static_cast<std::size_t>(b) * info.horizon + info.first_action_index + j) * info.action_dim + a];
        const float want = t * m["action_normalizer"]["scale"][a].get<float>() + m["action_normalizer"]["offset"][a].get<float>();
        EXPECT_NEAR(r.actions[(static_cast<std::size_t>(b) * info.n_action_steps + j) * info.action_dim + a], want, 1e-3f);
      }
}

TEST(Policy, BatchRowsMatchSingleRuns) {
  for (const std::string& bundle : {kLowdim, kImage}) {
    dpkit::Policy p(bundle, params(4));
    const auto& info = p.info();
    const dpkit::Sampler ddpm = p.find_sampler("ddpm", 10);
    const auto obs = observations(info, 4, 5);
    const auto init = randn(info.trajectory_size(4), 6), steps = randn(info.step_noise_size(ddpm, 4), 7);
    const Result all = run(p, obs, 4, ddpm, &init, &steps);
    const std::size_t n = info.trajectory_size(1), K = 10;
    for (int b = 0; b < 4; ++b) {
      std::vector<std::vector<float>> ob;
      for (std::size_t i = 0; i < obs.size(); ++i) {
        const std::size_t s = info.observation_size(i, 1);
        ob.emplace_back(obs[i].begin() + static_cast<long>(b * s), obs[i].begin() + static_cast<long>((b + 1) * s));
      }
      std::vector<float> init1(init.begin() + static_cast<long>(b * n), init.begin() + static_cast<long>((b + 1) * n)), steps1;
      for (std::size_t k = 0; k < K; ++k)
        steps1.insert(steps1.end(), steps.begin() + static_cast<long>((k * 4 + b) * n), steps.begin() + static_cast<long>((k * 4 + b + 1) * n));
      const Result one = run(p, ob, 1, ddpm, &init1, &steps1);
      const std::vector<float> row(all.traj.begin() + static_cast<long>(b * n), all.traj.begin() + static_cast<long>((b + 1) * n));
      EXPECT_LT(max_abs_diff(one.traj, row), 1e-5f) << bundle << " row " << b;
    }
  }
}

TEST(Policy, OnePolicyPerThreadRunsConcurrently) {
  dpkit::Policy ref(kLowdim, params(1, 7));
  const auto obs = observations(ref.info(), 1, 1);
  std::vector<Result> want;
  for (int i = 0; i < 10; ++i) want.push_back(run(ref, obs, 1, ref.find_sampler("ddpm", 100)));
  std::vector<std::vector<Result>> got(2);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      dpkit::Policy p(kLowdim, params(1, 7));
      for (int i = 0; i < 10; ++i) got[static_cast<std::size_t>(t)].push_back(run(p, obs, 1, p.find_sampler("ddpm", 100)));
    });
  for (auto& th : threads) th.join();
  for (const auto& g : got)
    for (int i = 0; i < 10; ++i) EXPECT_EQ(max_abs_diff(g[static_cast<std::size_t>(i)].traj, want[static_cast<std::size_t>(i)].traj), 0.0f);
}

TEST(Policy, BadInputsAreInputErrors) {
  dpkit::Policy p(kLowdim, params(2));
  const auto& info = p.info();
  auto obs = observations(info, 1, 1);
  std::vector<float> traj(info.trajectory_size(1)), actions(info.actions_size(1));
  auto call = [&](dpkit::SampleRequest req, dpkit::SampleOutput out) {  // by value: each call its own
    try {
      p.sample(req, out);
    } catch (const dpkit::InputError& e) {
      return std::string(e.what());
    }
    return std::string("(no InputError)");
  };
  auto good = [&] {
    dpkit::SampleRequest r;
    r.observations = {{obs[0].data(), obs[0].size()}};
    r.sampler = p.default_sampler();
    return r;
  };
  const dpkit::SampleOutput out{{traj.data(), traj.size()}, {actions.data(), actions.size()}};
  EXPECT_EQ(call(good(), out), "(no InputError)");

  auto r = good();
  r.batch = 3;
  EXPECT_MSG(call(r, out), "batch 3 is outside [1, max_batch = 2]");
  r.batch = 0;
  EXPECT_MSG(call(r, out), "batch 0");
  r = good();
  r.observations.push_back(r.observations[0]);
  EXPECT_MSG(call(r, out), "expected 1 observation arrays");
  r = good();
  r.observations[0].size -= 1;
  EXPECT_MSG(call(r, out), "observation 'obs': expected shape (1, 2, 20) = 40 floats, got 39");
  r = good();
  r.observations[0].data = nullptr;
  EXPECT_MSG(call(r, out), "got 0");
  obs[0][13] = NAN;
  EXPECT_MSG(call(good(), out), "observation 'obs' holds NaN at flat index 13");
  obs[0][13] = INFINITY;
  EXPECT_MSG(call(good(), out), "holds Inf");
  obs[0][13] = 1.0f;
  r = good();
  r.sampler = dpkit::Sampler();
  EXPECT_MSG(call(r, out), "SampleRequest::sampler is empty");
  dpkit::Policy other(kLowdim, params());
  r.sampler = other.find_sampler("ddim", 10);
  EXPECT_MSG(call(r, out), "SampleRequest::sampler ddim-10 was made by another Policy");
  EXPECT_MSG(call(good(), {}), "SampleOutput has no outputs");
  EXPECT_MSG(call(good(), {{nullptr, traj.size()}, {nullptr, actions.size()}}), "SampleOutput has no outputs");
  std::vector<float> noise(5);
  r = good();
  r.initial_noise = {noise.data(), noise.size()};
  EXPECT_MSG(call(r, out), "initial_noise: expected shape (1, 16, 2) = 32 floats, got 5");
  r = good();
  r.sampler = p.find_sampler("ddim", 10);
  r.step_noise = {noise.data(), noise.size()};
  EXPECT_MSG(call(r, out), "step_noise: expected shape (10, 1, 16, 2)");
  std::vector<float> bad_init(info.trajectory_size(1), 0.0f);
  bad_init[3] = NAN;
  r = good();
  r.initial_noise = {bad_init.data(), bad_init.size()};
  EXPECT_MSG(call(r, out), "initial_noise holds NaN");
  EXPECT_MSG(call(good(), {{traj.data(), 4}, {}}), "output trajectory: expected shape (1, 16, 2)");
  EXPECT_MSG(call(good(), {{}, {actions.data(), 3}}), "output actions: expected shape (1, 8, 2)");

  try {
    p.find_sampler("ddim", 7);
    FAIL();
  } catch (const dpkit::InputError& e) {
    EXPECT_MSG(std::string(e.what()), "no sampler ddim with 7 steps; available: ddpm-100, ddpm-10, ddim-10, ddim-100");
  }
  // After all those failures the policy still samples.
  EXPECT_EQ(call(good(), out), "(no InputError)");
}

TEST(Policy, BadBundlesAreNamed) {
  EXPECT_MSG(error_of([] { dpkit::Policy("/nonexistent/bundle", params()); }), "/nonexistent/bundle/policy.json");

  // The bundle rules themselves are load_manifest's (test_manifest.cpp's damaged-bundle table); these
  // check that Policy applies them, the sha256 included, and reports them naming the file.
  const std::string missing = copy_bundle(kLowdim, "missing");
  fs::remove(missing + "/denoiser.onnx");
  EXPECT_MSG(error_of([&] { dpkit::Policy(missing, params()); }),
             missing + "/policy.json: models.denoiser.file \"denoiser.onnx\" does not exist");

  const std::string tampered = copy_bundle(kLowdim, "tampered");
  json m = read_json(tampered + "/policy.json");
  m["models"]["encoder"]["sha256"] = std::string(64, 'a');
  write_json(tampered + "/policy.json", m);
  EXPECT_MSG(error_of([&] { dpkit::Policy(tampered, params()); }), "models.encoder.sha256 does not match encoder.onnx");
  auto unchecked = params();
  unchecked.verify_sha256 = false;
  EXPECT_NO_THROW(dpkit::Policy(tampered, unchecked));

  const std::string version = copy_bundle(kLowdim, "version");
  m = read_json(version + "/policy.json");
  m["format_version"] = 2;
  write_json(version + "/policy.json", m);
  EXPECT_MSG(error_of([&] { dpkit::Policy(version, params()); }), "format_version is 2");

  // The encoder graph where the denoiser should be: its inputs are named, with what was expected.
  const std::string swapped = copy_bundle(kLowdim, "swapped");
  m = read_json(swapped + "/policy.json");
  m["models"]["denoiser"]["file"] = "encoder.onnx";
  m["models"]["denoiser"]["sha256"] = m["models"]["encoder"]["sha256"];
  write_json(swapped + "/policy.json", m);
  EXPECT_MSG(error_of([&] { dpkit::Policy(swapped, params()); }), "models.denoiser.file \"encoder.onnx\": has 1 inputs");

  // A cond_dim that disagrees with the graphs.
  const std::string cond = copy_bundle(kLowdim, "cond");
  m = read_json(cond + "/policy.json");
  const int cond_dim = m["cond_dim"].get<int>();
  m["cond_dim"] = 5;
  write_json(cond + "/policy.json", m);
  EXPECT_MSG(error_of([&] { dpkit::Policy(cond, params()); }),
             "output 'cond' has shape (B, " + std::to_string(cond_dim) + "), expected (B, 5)");

  const std::string junk = copy_bundle(kLowdim, "junk");
  std::ofstream(junk + "/encoder.onnx") << "not a model";
  EXPECT_MSG(error_of([&] { dpkit::Policy(junk, unchecked); }), "is not a valid ONNX model");
}

TEST(Policy, ProvidersNeverFallBackSilently) {
  auto p = params();
  // Either the provider is there and in use, or a clear error lists what the ONNX Runtime has (the CPU
  // wheel has no CUDA provider) -- never a CPU session under a GPU name.
  for (const char* provider : {"cuda", "tensorrt"}) {
    p.provider = provider;
    try {
      dpkit::Policy policy(kLowdim, p);
      EXPECT_EQ(policy.info().provider, provider);
    } catch (const dpkit::Error& e) {
      const std::string msg = e.what();
      EXPECT_MSG(msg, std::string("provider \"") + provider + "\" is not available");
      EXPECT_MSG(msg, "CPUExecutionProvider");
    }
  }
  p.provider = "tpu";
  EXPECT_MSG(error_of([&] { dpkit::Policy(kLowdim, p); }), "unknown provider \"tpu\"");
  p.provider = "cpu";
  p.max_batch = 0;
  EXPECT_MSG(error_of([&] { dpkit::Policy(kLowdim, p); }), "max_batch must be >= 1");
}

TEST(Policy, MovedFromIsAnErrorNotACrash) {
  dpkit::Policy p(kLowdim, params());
  dpkit::Policy q(std::move(p));
  EXPECT_EQ(q.info().horizon, 16);
  dpkit::SampleRequest req;
  // NOLINTBEGIN(bugprone-use-after-move)
  dpkit::SampleOutput out;
  EXPECT_MSG(error_of([&] { p.sample(req, out); }), "moved from");
  EXPECT_MSG(error_of([&] { p.info(); }), "moved from");
  EXPECT_MSG(error_of([&] { p.find_sampler("ddim", 10); }), "moved from");
  EXPECT_MSG(error_of([&] { p.default_sampler(); }), "moved from");
  EXPECT_MSG(error_of([&] { p.reseed(1); }), "moved from");
  EXPECT_MSG(error_of([&] { p.last_timing(); }), "moved from");
  // NOLINTEND(bugprone-use-after-move)
}

TEST(Policy, AbsurdMaxBatchIsRefusedBeforeAllocating) {
  auto p = params();
  p.max_batch = 1000000000;
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    dpkit::Policy policy(kImage, p);
  } catch (const dpkit::InputError& e) {
    msg = e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 2.0);
  EXPECT_MSG(msg, "PolicyParams::max_batch = 1000000000 needs ");
  EXPECT_MSG(msg, "TiB (");  // image bundle: about 230 KB per batch item
  EXPECT_MSG(msg, "bytes per batch item) of preallocated buffers for this bundle; the limit is 4.0 GiB");
  p.max_batch = dpkit::kMaxBatchLimit + 1;  // a low-dim batch item is small: the count limit applies
  EXPECT_MSG(error_of([&] { dpkit::Policy(kLowdim, p); }), "max_batch = 4097 exceeds the limit of 4096");
}

TEST(Policy, EitherOutputAloneIsWritten) {
  dpkit::Policy p(kLowdim, params());
  const auto obs = observations(p.info(), 1, 1);
  const auto init = randn(p.info().trajectory_size(), 3);
  const Result both = run(p, obs, 1, p.find_sampler("ddim", 10), &init);
  dpkit::SampleRequest req;
  req.observations = {{obs[0].data(), obs[0].size()}};
  req.sampler = p.find_sampler("ddim", 10);
  req.initial_noise = {init.data(), init.size()};
  std::vector<float> traj(p.info().trajectory_size()), actions(p.info().actions_size());
  dpkit::SampleOutput only_traj;
  only_traj.trajectory = {traj.data(), traj.size()};
  p.sample(req, only_traj);
  EXPECT_EQ(max_abs_diff(traj, both.traj), 0.0f);
  dpkit::SampleOutput only_actions;
  only_actions.actions = {actions.data(), actions.size()};
  p.sample(req, only_actions);
  EXPECT_EQ(max_abs_diff(actions, both.actions), 0.0f);
}

// ---- inpainting: a committed prefix (numpy-parity in tests/test_inpaint.py) ------------------------------
namespace {
Result run_prefix(dpkit::Policy& p, const std::vector<std::vector<float>>& obs, int b, const dpkit::Sampler& sampler,
                  const std::vector<float>& init, const std::vector<float>* prefix, int rows, int start = -1,
                  const std::vector<float>* weights = nullptr) {
  dpkit::SampleRequest req;
  req.batch = b;
  req.sampler = sampler;
  for (const auto& o : obs) req.observations.push_back({o.data(), o.size()});
  req.initial_noise = {init.data(), init.size()};
  if (prefix) req.prefix = {prefix->data(), prefix->size()};
  req.prefix_rows = prefix ? rows : 0;
  req.prefix_start = start;
  if (weights) req.prefix_weights = {weights->data(), weights->size()};
  return run_request(p, req);
}
}  // namespace

TEST(Policy, InpaintedRowsEndAsThePrefix) {
  dpkit::Policy p(kLowdim, params(2));
  const auto& info = p.info();
  const int H = info.horizon, A = info.action_dim, P = 3, B = 2;
  const auto obs = observations(info, B, 1);
  const auto init = randn(info.trajectory_size(B), 3);
  const auto prefix = randn(static_cast<std::size_t>(B) * P * A, 5, 0.5f);  // a different prefix per batch item
  for (const char* kind : {"ddim", "ddpm"}) {
    const dpkit::Sampler s = p.find_sampler(kind, 10);
    p.reseed(1);
    const Result free = run_prefix(p, obs, B, s, init, nullptr, 0);
    for (int start : {info.first_action_index, 0, H - P}) {
      p.reseed(1);
      const Result r = run_prefix(p, obs, B, s, init, &prefix, P, start);
      for (int b = 0; b < B; ++b)
        for (int j = 0; j < P * A; ++j)  // the final alpha_cumprod is 1: exactly the prefix
          EXPECT_EQ(r.traj[(static_cast<std::size_t>(b) * H + start) * A + j], prefix[b * P * A + j]) << kind;
      EXPECT_GT(max_abs_diff(r.traj, free.traj), 1e-3f) << kind;
    }
    p.reseed(1);  // -1 is first_action_index
    const Result by_default = run_prefix(p, obs, B, s, init, &prefix, P, -1);
    p.reseed(1);
    EXPECT_EQ(by_default.traj, run_prefix(p, obs, B, s, init, &prefix, P, info.first_action_index).traj);
  }
}

TEST(Policy, InpaintingWeightsBlend) {
  dpkit::Policy p(kLowdim, params());
  const auto& info = p.info();
  const int A = info.action_dim, i0 = info.first_action_index;
  const auto obs = observations(info, 1, 1);
  const auto init = randn(info.trajectory_size(), 3);
  const auto prefix = randn(static_cast<std::size_t>(3) * A, 5, 0.5f);
  const dpkit::Sampler s = p.find_sampler("ddim", 10);
  const Result free = run_prefix(p, obs, 1, s, init, nullptr, 0);
  const std::vector<float> zero(3, 0.0f), soft = {1.0f, 0.5f, 0.25f};
  EXPECT_EQ(run_prefix(p, obs, 1, s, init, &prefix, 3, -1, &zero).traj, free.traj);  // weight 0: no prefix
  const Result hard = run_prefix(p, obs, 1, s, init, &prefix, 3);
  const Result blended = run_prefix(p, obs, 1, s, init, &prefix, 3, -1, &soft);
  for (int a = 0; a < A; ++a) EXPECT_EQ(blended.traj[i0 * A + a], prefix[a]);  // weight 1: exact
  float gap = 0;
  for (int a = A; a < 3 * A; ++a) gap = std::max(gap, std::fabs(blended.traj[i0 * A + a] - hard.traj[i0 * A + a]));
  EXPECT_GT(gap, 1e-4f);
}

TEST(Policy, BadPrefixesAreInputErrors) {
  dpkit::Policy p(kLowdim, params(2));
  const auto& info = p.info();
  const auto obs = observations(info, 1, 1);
  std::vector<float> traj(info.trajectory_size(1)), prefix(3 * 2, 0.1f), w = {1.0f, 0.5f, 0.0f};
  auto call = [&](int rows, int start, std::size_t size, const std::vector<float>* weights, const float* data) {
    dpkit::SampleRequest r;
    r.observations = {{obs[0].data(), obs[0].size()}};
    r.sampler = p.default_sampler();
    r.prefix = {data, size};
    r.prefix_rows = rows;
    r.prefix_start = start;
    if (weights) r.prefix_weights = {weights->data(), weights->size()};
    dpkit::SampleOutput out{{traj.data(), traj.size()}, {}};
    return error_of([&] { p.sample(r, out); });
  };
  EXPECT_EQ(call(3, -1, 6, &w, prefix.data()), "(no error)");
  EXPECT_MSG(call(3, 14, 6, nullptr, prefix.data()), "prefix of 3 rows starting at 14 does not fit the horizon 16");
  EXPECT_MSG(call(17, 0, 34, nullptr, prefix.data()), "does not fit the horizon 16");
  EXPECT_MSG(call(0, 0, 0, nullptr, prefix.data()), "prefix of 0 rows");
  EXPECT_MSG(call(3, -2, 6, nullptr, prefix.data()), "starting at -2");
  EXPECT_MSG(call(3, -1, 5, nullptr, prefix.data()), "prefix: expected shape (1, 3, 2) = 6 floats, got 5");
  std::vector<float> bad_w = {1.0f, 1.5f, 0.0f}, nan_w = {1.0f, NAN, 0.0f}, short_w = {1.0f};
  EXPECT_MSG(call(3, -1, 6, &bad_w, prefix.data()), "prefix weights must be 3 values in [0, 1]");
  EXPECT_MSG(call(3, -1, 6, &nan_w, prefix.data()), "prefix weights must be 3 values in [0, 1]");
  EXPECT_MSG(call(3, -1, 6, &short_w, prefix.data()), "prefix weights must be 3 values in [0, 1], got 1");
  EXPECT_MSG(call(3, -1, 6, &w, nullptr), "prefix_rows / prefix_weights given without a prefix");
  prefix[4] = NAN;
  EXPECT_MSG(call(3, -1, 6, nullptr, prefix.data()), "prefix contains NaN or Inf");
}

// ---- "sample() allocates nothing" -----------------------------------------------------------------------
// This test binary replaces the global operator new/delete with malloc/free plus a counter that counts
// only while armed. Every C++ allocation in the process goes through them, ONNX Runtime's included:
// libonnxruntime.so takes operator new from the process's symbols, so the executable's definition wins.
// Measured with the onnxruntime 1.2x/1.3x CPU wheel: each session Run() allocates (about 50 times per
// denoiser run: its execution frame, shape bookkeeping), which dpkit cannot prevent through the ORT API.
// So each counted allocation is attributed by its call stack: with a libonnxruntime frame on it, it is
// ONNX Runtime's; without, it is dpkit's (or the test's) -- and dpkit's must stay at zero.
namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_dpkit_allocations{0}, g_ort_allocations{0};
thread_local bool t_in_counter = false;  // backtrace/dladdr must not count (or recurse into) themselves

bool onnxruntime_on_stack() {
  void* frames[128];
  const int n = backtrace(frames, 128);
  for (int i = 0; i < n; ++i) {
    Dl_info d;
    if (dladdr(frames[i], &d) && d.dli_fname && std::strstr(d.dli_fname, "libonnxruntime")) return true;
  }
  return false;
}

void* counted_new(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed) && !t_in_counter) {
    t_in_counter = true;
    (onnxruntime_on_stack() ? g_ort_allocations : g_dpkit_allocations).fetch_add(1, std::memory_order_relaxed);
    t_in_counter = false;
  }
  return std::malloc(n ? n : 1);
}
}  // namespace

void* operator new(std::size_t n) {
  if (void* p = counted_new(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = counted_new(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

TEST(Policy, SampleAllocatesNothing) {
  // The counter is live and attributes an allocation outside ONNX Runtime to dpkit.
  void* frame[1];
  backtrace(frame, 1);  // loads the unwinder now, not inside the first counted call
  g_counting = true;
  auto probe = std::make_unique<std::vector<int>>(3);
  g_counting = false;
  ASSERT_EQ(g_dpkit_allocations.exchange(0), 2) << "the operator new replacement is not in effect";
  probe.reset();

  for (const std::string& bundle : {kLowdim, kImage}) {
    dpkit::Policy p(bundle, params(3));
    const auto& info = p.info();
    // Everything the calls use is made before counting starts, as a controller would.
    const auto obs1 = observations(info, 1, 1), obs3 = observations(info, 3, 2);
    const dpkit::Sampler ddpm = p.find_sampler("ddpm", 10), ddim = p.find_sampler("ddim", 10);
    const auto init = randn(info.trajectory_size(3), 3), steps = randn(info.step_noise_size(ddpm, 3), 4);
    std::vector<float> traj(info.trajectory_size(3)), actions(info.actions_size(3));
    dpkit::SampleRequest r1, r3;
    r1.sampler = ddpm;  // generator noise, every step
    for (const auto& o : obs1) r1.observations.push_back({o.data(), o.size()});
    r3.batch = 3;
    r3.sampler = ddpm;  // injected noise
    for (const auto& o : obs3) r3.observations.push_back({o.data(), o.size()});
    r3.initial_noise = {init.data(), init.size()};
    r3.step_noise = {steps.data(), steps.size()};
    const std::vector<float> prefix(static_cast<std::size_t>(3) * 4 * info.action_dim, 0.25f), weights = {1, 1, 0.5f, 0.25f};
    r3.prefix = {prefix.data(), prefix.size()};  // inpainting allocates nothing either
    r3.prefix_rows = 4;
    r3.prefix_weights = {weights.data(), weights.size()};
    dpkit::SampleOutput out1{{traj.data(), info.trajectory_size(1)}, {actions.data(), info.actions_size(1)}};
    dpkit::SampleOutput out3{{traj.data(), traj.size()}, {actions.data(), actions.size()}};

    g_dpkit_allocations = 0;
    g_ort_allocations = 0;
    g_counting = true;
    for (int i = 0; i < 5; ++i) {
      r1.sampler = i % 2 ? ddim : ddpm;
      p.sample(r1, out1);  // batch 1 and max_batch: the sizes warmed up at load
      p.sample(r3, out3);
    }
    g_counting = false;
    EXPECT_EQ(g_dpkit_allocations.load(), 0) << bundle << ": dpkit's heap allocations during 10 sample() calls";
    // For the report (not a promise dpkit can keep for ONNX Runtime): 10 calls = 10 encoder + 100 denoiser runs.
    std::printf("%s: ONNX Runtime made %ld allocations in 110 runs; dpkit made %ld\n", bundle.c_str(),
                g_ort_allocations.load(), g_dpkit_allocations.load());
  }
}

TEST(Policy, ControllerStepAllocatesNothing) {
  dpkit::Policy p(kLowdim, params(2));
  const auto& info = p.info();
  for (auto e : {dpkit::Execution::sync, dpkit::Execution::async, dpkit::Execution::async_inpaint}) {
    dpkit::ControllerParams cp;
    cp.execution = e;
    cp.delay = 2;
    cp.blend = 2;
    cp.batch = 2;
    dpkit::RealTimeController ctl(p, cp);
    const auto obs = randn(2 * info.observations[0].step_size, 1, 100.0f, 256.0f);
    std::vector<float> action(2 * static_cast<std::size_t>(info.action_dim));
    ctl.step(obs.data(), action.data());  // start-up outside the count (like any first call)
    g_dpkit_allocations = 0;
    g_counting = true;
    for (int n = 0; n < 40; ++n) ctl.step(obs.data(), action.data());  // both threads, 5+ chunks
    g_counting = false;
    EXPECT_EQ(g_dpkit_allocations.load(), 0) << "dpkit's heap allocations during 40 controller ticks";
    EXPECT_GE(ctl.stats().chunks, 5);
  }
}
