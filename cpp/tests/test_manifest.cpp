// policy.json parsing: the generated test bundle parses; each corruption names the offending key.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"

using nlohmann::json;
namespace d = dpkit::detail;

namespace {

json bundle_manifest(const std::string& mode) {
  std::ifstream f(std::string(DPKIT_TEST_BUNDLES) + "/" + mode + "/policy.json");
  EXPECT_TRUE(f.good());
  return json::parse(f);
}

std::string parse_error(const json& j) {
  try {
    d::parse_manifest(j.dump(), "policy.json");
  } catch (const dpkit::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Manifest, ParsesBothTestBundles) {
  const d::Manifest low = d::parse_manifest(bundle_manifest("lowdim").dump(), "x");
  EXPECT_EQ(low.obs_mode, "lowdim");
  EXPECT_EQ(low.n_obs_steps, 2);
  EXPECT_EQ(low.horizon, 16);
  EXPECT_EQ(low.first_action_index, 1);
  ASSERT_EQ(low.observations.size(), 1u);
  EXPECT_EQ(low.observations[0].step_size, 20u);
  EXPECT_EQ(low.alphas_cumprod.size(), 100u);
  EXPECT_EQ(low.samplers[static_cast<std::size_t>(low.default_sampler)].name, "ddim-10");
  EXPECT_TRUE(low.clip_sample);
  const d::Manifest img = d::parse_manifest(bundle_manifest("image").dump(), "x");
  ASSERT_EQ(img.observations.size(), 2u);
  EXPECT_EQ(img.observations[0].step_size, 3u * 96 * 96);
  EXPECT_EQ(img.observations[1].name, "agent_pos");
}

TEST(Manifest, EveryCorruptionIsNamed) {
  struct Case {
    const char* pointer;  // JSON pointer to change
    json value;           // null = remove the key
    const char* expect;   // substring of the message
  };
  const std::vector<Case> cases = {
      {"/format_version", 2, "format_version"},
      {"/format_version", nullptr, "format_version is missing"},
      {"/format", "other", "format"},
      {"/obs_mode", "pixels", "obs_mode"},
      {"/horizon", "16", "horizon must be an integer"},
      {"/horizon", 4, "exceeds horizon"},
      {"/n_obs_steps", 0, "n_obs_steps must be >= 1"},
      {"/action_normalizer/scale", json::array({1.0}), "action_normalizer.scale must be a list of 2"},
      {"/scheduler/betas", json::array({0.1}), "scheduler.betas"},
      {"/scheduler/alphas_cumprod/3", 1.5, "alphas_cumprod"},
      {"/scheduler/prediction_type", "sample", "prediction_type"},
      {"/scheduler/variance_type", "fixed_large", "variance_type"},
      {"/scheduler/default_sampler", "ddim-7", "ddim-7"},
      {"/scheduler/samplers/0/sampler", "euler", "samplers[0].sampler"},
      {"/scheduler/samplers/1/timesteps/0", 100, "samplers[1].timesteps"},
      {"/scheduler/samplers/2/prev_timesteps", json::array({1, 2}), "samplers[2].prev_timesteps"},
      {"/scheduler/samplers/2/eta", 0.5, "eta"},
      {"/scheduler/clip_sample", 1, "clip_sample must be true or false"},
      {"/models/encoder/sha256", "abc", "models.encoder.sha256"},
      {"/models/denoiser/file", "../x.onnx", "models.denoiser.file"},
      {"/models/denoiser/inputs", json::array({"sample", "cond"}), "models.denoiser.inputs"},
      {"/models/encoder/outputs", json::array({"z"}), "models.encoder.outputs"},
      {"/models/encoder/inputs", json::array({"state"}), "models.encoder.inputs"},
      {"/models/encoder/dtype", "bfloat16", "models.encoder.dtype"},
      {"/tensorrt", json{{"precision", "fp16"}}, "tensorrt.max_batch is missing"},
      {"/tensorrt", json{{"precision", "fp16"}, {"max_batch", 8}, {"cache_dir", "../x"}}, "tensorrt.cache_dir"},
      {"/observations", json::array(), "observations"},
      {"/observations/0/shape", json::array({0}), "observations[0].shape"},
      {"/scheduler", nullptr, "scheduler is missing"},
  };
  for (const Case& c : cases) {
    json j = bundle_manifest("lowdim");
    const json::json_pointer ptr(c.pointer);
    if (c.value.is_null()) j[ptr.parent_pointer()].erase(ptr.back());
    else j[ptr] = c.value;
    const std::string msg = parse_error(j);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.pointer << ": got '" << msg << "'";
    EXPECT_EQ(msg.rfind("policy.json: ", 0), 0u) << msg;
  }
}

TEST(Manifest, Fp16GraphsAndTensorRTEntry) {
  json j = bundle_manifest("lowdim");
  j["models"]["denoiser"]["dtype"] = "float16";  // --fp16 graphs keep float32 inputs and outputs
  j["tensorrt"] = {{"cache_dir", "engines"}, {"max_batch", 16}, {"precision", "fp16"}, {"route", "ort"}};
  const d::Manifest m = d::parse_manifest(j.dump(), "x");
  EXPECT_EQ(m.denoiser.dtype, "float16");
  EXPECT_TRUE(m.has_tensorrt);
  EXPECT_EQ(m.tensorrt_cache_dir, "engines");
  EXPECT_EQ(m.tensorrt_max_batch, 16);
  EXPECT_EQ(m.tensorrt_precision, "fp16");
  EXPECT_FALSE(d::parse_manifest(bundle_manifest("lowdim").dump(), "x").has_tensorrt);
}

TEST(Manifest, NotJsonAndMissingFile) {
  try {
    d::parse_manifest("{not json", "b/policy.json");
    FAIL();
  } catch (const dpkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("b/policy.json: not valid JSON"), std::string::npos) << e.what();
  }
  try {
    d::load_manifest("/nonexistent_bundle");
    FAIL();
  } catch (const dpkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent_bundle/policy.json"), std::string::npos) << e.what();
  }
}
