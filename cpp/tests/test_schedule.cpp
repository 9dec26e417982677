// The step arithmetic against diffusers (data/schedule_fixture.json, from make_schedule_fixture.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "internal.hpp"

using nlohmann::json;
namespace d = dpkit::detail;

namespace {

json load_fixture() {
  std::ifstream f(std::string(DPKIT_TEST_DATA) + "/schedule_fixture.json");
  EXPECT_TRUE(f.good());
  return json::parse(f);
}

// A manifest whose scheduler is the fixture's, via the real parser (the rest is minimal but valid).
d::Manifest manifest_with(const json& scheduler) {
  json m = {{"format", "dpkit-bundle"}, {"format_version", 1}, {"obs_mode", "lowdim"}, {"n_obs_steps", 2},
            {"horizon", 16}, {"n_action_steps", 8}, {"action_dim", 2}, {"first_action_index", 1}, {"cond_dim", 4},
            {"observations", json::array({{{"name", "obs"}, {"shape", {20}}, {"dtype", "float32"}}})},
            {"action_normalizer", {{"scale", {1.0, 1.0}}, {"offset", {0.0, 0.0}}}},
            {"scheduler", scheduler},
            {"models", {{"encoder", {{"file", "encoder.onnx"}, {"sha256", std::string(64, 'a')}, {"inputs", {"obs"}},
                                     {"outputs", {"cond"}}, {"dtype", "float32"}}},
                        {"denoiser", {{"file", "denoiser.onnx"}, {"sha256", std::string(64, 'b')},
                                      {"inputs", {"sample", "timestep", "cond"}}, {"outputs", {"noise_pred"}},
                                      {"dtype", "float32"}}}}}};
  return d::parse_manifest(m.dump(), "fixture");
}

}  // namespace

// "ours" is the numpy reference's step (dpkit.runtime.sampling): both homes round the same float32 operations
// in the same order, so they agree bit for bit. "out" is diffusers' own step: the same operations, but
// PyTorch's CPU sqrt (MKL's vector sqrt) is not always correctly rounded, so a scalar can be one ulp off:
// measured <= 2.3e-7 relative on this fixture (the float64 coefficients before were ~4e-6 off).
// Each case names the prediction type its denoiser output means ("epsilon", or "sample": x0).
TEST(Schedule, MatchesDiffusersStepByStep) {
  const json fx = load_fixture();
  int checked = 0, sample_cases = 0;
  for (const json& c : fx["cases"]) {
    json scheduler = fx["scheduler"];
    scheduler["prediction_type"] = c["prediction_type"];
    const d::Manifest m = manifest_with(scheduler);
    sample_cases += m.prediction_type == "sample";
    const std::string name = std::string(c["sampler"]) + " " + m.prediction_type;
    const auto it = std::find_if(m.samplers.begin(), m.samplers.end(),
                                 [&](const auto& s) { return s.name == c["sampler"]; });
    ASSERT_NE(it, m.samplers.end()) << name;
    const auto steps = d::make_steps(m, *it);
    ASSERT_EQ(steps.size(), c["steps"].size()) << name;
    for (std::size_t k = 0; k < steps.size(); ++k) {
      const json& s = c["steps"][k];
      ASSERT_EQ(steps[k].timestep, s["t"].get<int64_t>()) << name << " step " << k;
      std::vector<float> x = s["x"], eps = s["eps"], noise = s["noise"], want = s["out"], ours = s["ours"];
      d::apply_step(steps[k], m.clip_sample, static_cast<float>(m.clip_sample_range), x.data(), eps.data(), noise.data(),
                    x.size());
      for (std::size_t i = 0; i < x.size(); ++i, ++checked) {
        EXPECT_EQ(x[i], ours[i]) << name << " step " << k << " i " << i;
        EXPECT_NEAR(x[i], want[i], 1e-6 * std::max(1.0f, std::fabs(want[i]))) << name << " step " << k << " i " << i;
      }
    }
  }
  EXPECT_GT(checked, 1800);
  EXPECT_EQ(sample_cases, 3);
}

// An alphas_cumprod value that is < 1 in double but rounds to 1 in float32 would divide by zero.
TEST(Schedule, RefusesAStepThatIsDegenerateInFloat32) {
  json scheduler = load_fixture()["scheduler"];
  scheduler["alphas_cumprod"][0] = 1.0 - 1e-9;
  const d::Manifest m = manifest_with(scheduler);
  const auto it = std::find_if(m.samplers.begin(), m.samplers.end(), [](const auto& s) { return s.name == "ddpm-100"; });
  ASSERT_NE(it, m.samplers.end());
  try {
    d::make_steps(m, *it);
    FAIL() << "no error";
  } catch (const dpkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("degenerate step"), std::string::npos) << e.what();
  }
}

TEST(Schedule, NoiseOnlyWhereTheSpecSaysSo) {
  const d::Manifest m = manifest_with(load_fixture()["scheduler"]);
  for (const auto& s : m.samplers) {
    const auto steps = d::make_steps(m, s);
    for (const auto& c : steps) {
      if (s.sampler == "ddim" || c.timestep == 0) EXPECT_EQ(c.sigma, 0.0f) << s.name << " t=" << c.timestep;
      else EXPECT_GT(c.sigma, 0.0f) << s.name << " t=" << c.timestep;
    }
  }
}

TEST(Schedule, ClipOnlyWhenAsked) {
  d::StepCoefficients c;  // x0 = x (a_t = 0 limit would be degenerate; use unit scale), out = x0
  c.sqrt_1m_at = 0.0f;
  c.sqrt_at = 1.0f;
  c.c_x0 = 1.0f;
  float x[3] = {-5.0f, 0.5f, 5.0f}, eps[3] = {0, 0, 0};
  d::apply_step(c, true, 1.0f, x, eps, nullptr, 3);
  EXPECT_EQ(x[0], -1.0f);
  EXPECT_EQ(x[1], 0.5f);
  EXPECT_EQ(x[2], 1.0f);
  float y[2] = {-5.0f, 5.0f};
  d::apply_step(c, false, 1.0f, y, eps, nullptr, 2);
  EXPECT_EQ(y[0], -5.0f);
  EXPECT_EQ(y[1], 5.0f);
}

// The few-step rule (a distilled student): x0 re-noised to the next listed timestep, x0 after the last; the
// same float32 operations as dpkit.sampling.StepPlan (c_x = 0, so x' = c_x0 * x0 + sigma * noise).
TEST(Schedule, FewstepRenoisesToTheNextTimestep) {
  json sched = load_fixture()["scheduler"];
  sched["prediction_type"] = "sample";
  sched["samplers"] = json::array({{{"name", "fewstep-2"}, {"sampler", "fewstep"}, {"num_inference_steps", 2},
                                    {"timesteps", {99, 49}}, {"prev_timesteps", {49, -1}},
                                    {"final_alpha_cumprod", 1.0}, {"eta", 0.0}}});
  sched["default_sampler"] = "fewstep-2";
  const d::Manifest m = manifest_with(sched);
  const auto steps = d::make_steps(m, m.samplers[0]);
  ASSERT_EQ(steps.size(), 2u);
  const float a_mid = static_cast<float>(m.alphas_cumprod[49]);
  EXPECT_EQ(steps[0].c_x0, std::sqrt(a_mid));
  EXPECT_EQ(steps[0].sigma, std::sqrt(1.0f - a_mid));
  EXPECT_EQ(steps[0].c_x, 0.0f);
  EXPECT_EQ(steps[1].c_x0, 1.0f);
  EXPECT_EQ(steps[1].sigma, 0.0f);  // the last step returns x0: no noise
  float x[3] = {0.3f, -2.0f, 7.0f}, out[3] = {0.5f, -3.0f, 0.25f}, noise[3] = {1.0f, -1.0f, 0.5f};
  float want[3];
  for (int i = 0; i < 3; ++i) {
    const float x0 = std::min(std::max(out[i], -1.0f), 1.0f);
    want[i] = std::sqrt(a_mid) * x0 + std::sqrt(1.0f - a_mid) * noise[i];
  }
  d::apply_step(steps[0], true, 1.0f, x, out, noise, 3);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(x[i], want[i]) << i;
  d::apply_step(steps[1], true, 1.0f, x, out, nullptr, 3);
  EXPECT_EQ(x[0], 0.5f);
  EXPECT_EQ(x[1], -1.0f);
  EXPECT_EQ(x[2], 0.25f);
}
