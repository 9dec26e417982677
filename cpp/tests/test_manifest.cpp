// The one bundle reader: the generated test bundles load; every case of the damaged-bundle table
// (data/damaged_bundles.json, also run through Python's entry point dpkit.runtime.bundle.load_bundle by
// tests/test_bundle_contract.py) is refused with the table's message; the .onnx walk; the TensorRT profile.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"
#include "manifest.hpp"

using nlohmann::json;
namespace d = dpkit::detail;
namespace fs = std::filesystem;

namespace {

const fs::path kGolden = fs::path(DPKIT_GOLDEN_DIR);

json read_json(const fs::path& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  return json::parse(f);
}

json bundle_manifest(const std::string& mode) { return read_json(fs::path(DPKIT_TEST_BUNDLES) / mode / "policy.json"); }

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t i = s.find(from); i != std::string::npos; i = s.find(from, i + to.size())) s.replace(i, from.size(), to);
  return s;
}

// The table's edits (its `about` says what each does), in order; policy.json is written once at the end.
void apply_edits(const fs::path& bundle, const json& edits) {
  json j = read_json(bundle / "policy.json");
  std::vector<std::pair<std::string, std::string>> text_ops;  // (old, new); old "" = replace the whole text
  for (const json& e : edits) {
    if (e.contains("set")) {
      j[json::json_pointer(e["set"].get<std::string>())] = e["value"];
    } else if (e.contains("delete")) {
      const json::json_pointer p(e["delete"].get<std::string>());
      j[p.parent_pointer()].erase(p.back());
    } else if (e.contains("nest")) {
      j[json::json_pointer(e["nest"].get<std::string>())] = "__NEST__";
      const std::size_t depth = e["depth"].get<std::size_t>();
      text_ops.emplace_back("\"__NEST__\"", std::string(depth, '[') + std::string(depth, ']'));
    } else if (e.contains("replace")) {
      text_ops.emplace_back(e["replace"][0].get<std::string>(), e["replace"][1].get<std::string>());
    } else if (e.contains("write_file")) {  // before "text": this edit has a `text` too
      std::ofstream(bundle / e["write_file"].get<std::string>()) << e["text"].get<std::string>();
    } else if (e.contains("text")) {
      text_ops.emplace_back("", e["text"].get<std::string>());
    } else if (e.contains("delete_file")) {
      fs::remove(bundle / e["delete_file"].get<std::string>());
    } else if (e.contains("flip_byte")) {
      const fs::path f = bundle / e["flip_byte"].get<std::string>();
      std::fstream s(f, std::ios::in | std::ios::out | std::ios::binary);
      s.seekg(e["offset"].get<std::streamoff>());
      char c = 0;
      s.read(&c, 1);
      c = static_cast<char>(c ^ 0xFF);
      s.seekp(e["offset"].get<std::streamoff>());
      s.write(&c, 1);
    } else if (e.contains("mkdir")) {
      fs::create_directory(bundle / e["mkdir"].get<std::string>());
    } else if (e.contains("move_outside")) {
      const std::string name = e["move_outside"].get<std::string>();
      const fs::path outside = bundle.parent_path() / (bundle.filename().string() + "_outside");
      fs::create_directories(outside);
      fs::rename(bundle / name, outside / name);
      fs::create_symlink(fs::absolute(outside / name), bundle / name);
    } else {
      ADD_FAILURE() << "unknown edit " << e.dump();
    }
  }
  std::string text = j.dump();
  for (const auto& [from, to] : text_ops) text = from.empty() ? to : replace_all(text, from, to);
  std::ofstream(bundle / "policy.json") << text;
}

// What the C++ reader says about the bundle folder ("" = accepted): the manifest and file rules, then sha256.
std::string read_error(const fs::path& bundle) {
  try {
    const d::Manifest m = d::load_manifest(bundle.string());
    d::verify_bundle_sha256(m, bundle.string());
  } catch (const dpkit::Error& e) {
    return e.what();
  }
  return "";
}

class TempDir {
 public:
  TempDir() : path_(fs::temp_directory_path() / ("dpkit_manifest_test_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string parse_error(const json& j) {
  try {
    d::parse_manifest(j.dump(), "policy.json");
  } catch (const dpkit::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Manifest, LoadsBothTestBundles) {
  const d::Manifest low = d::load_manifest(std::string(DPKIT_TEST_BUNDLES) + "/lowdim");
  EXPECT_EQ(low.obs_mode, "lowdim");
  EXPECT_EQ(low.n_obs_steps, 2);
  EXPECT_EQ(low.horizon, 16);
  EXPECT_EQ(low.first_action_index, 1);
  ASSERT_EQ(low.observations.size(), 1u);
  EXPECT_EQ(low.observations[0].step_size, 20u);
  EXPECT_EQ(low.alphas_cumprod.size(), 100u);
  EXPECT_EQ(low.samplers[static_cast<std::size_t>(low.default_sampler)].name, "ddim-10");
  EXPECT_TRUE(low.clip_sample);
  EXPECT_TRUE(low.encoder_external_data.empty() && low.denoiser_external_data.empty());
  const d::Manifest img = d::load_manifest(std::string(DPKIT_TEST_BUNDLES) + "/image");
  ASSERT_EQ(img.observations.size(), 2u);
  EXPECT_EQ(img.observations[0].step_size, 3u * 96 * 96);
  EXPECT_EQ(img.observations[1].name, "agent_pos");
  for (const char* mode : {"lowdim", "image"})
    EXPECT_EQ(read_error(fs::path(DPKIT_TEST_BUNDLES) / mode), "") << mode;
}

TEST(Manifest, DamagedBundleTable) {
  const json table = read_json(fs::path(DPKIT_TEST_DATA) / "damaged_bundles.json");
  ASSERT_GE(table["cases"].size(), 30u);
  for (const std::string base : {"bundle", "bundle_external"}) EXPECT_EQ(read_error(kGolden / base), "") << base;
  for (const json& c : table["cases"]) {
    const std::string name = c["name"];
    TempDir tmp;
    const fs::path bundle = tmp.path() / "b";
    fs::copy(kGolden / c.value("base", "bundle"), bundle, fs::copy_options::recursive);
    apply_edits(bundle, c["edits"]);
    const std::string msg = read_error(bundle), expect = c["expect"];
    EXPECT_NE(msg.find(expect), std::string::npos) << name << ": expected '" << expect << "', got '" << msg << "'";
    EXPECT_EQ(msg.rfind(bundle.string() + "/policy.json: ", 0), 0u) << name << ": " << msg;
  }
}

TEST(Manifest, PrecisionIsReadOrImpliedByDtype) {
  json j = bundle_manifest("lowdim");
  EXPECT_EQ(d::parse_manifest(j.dump(), "x").denoiser.precision, "fp32");  // dpkit-export writes it
  j["models"]["denoiser"]["precision"] = "int8";
  j["models"]["denoiser"]["quantization"] = {{"method", "dynamic"}, {"per_channel", false}, {"op_types", {"MatMul"}},
                                             {"nodes_quantized", 3}, {"onnxruntime_version", "1.32.0"}};
  EXPECT_EQ(d::parse_manifest(j.dump(), "x").denoiser.precision, "int8");
  j["models"]["denoiser"].erase("precision");  // bundles from before int8: fp32/fp16 from dtype
  j["models"]["denoiser"].erase("quantization");
  j["models"]["denoiser"]["dtype"] = "float16";
  EXPECT_EQ(d::parse_manifest(j.dump(), "x").denoiser.precision, "fp16");
}

TEST(Manifest, TensorRTProfile) {
  const d::Manifest m = d::parse_manifest(bundle_manifest("lowdim").dump(), "x");
  EXPECT_TRUE(m.has_tensorrt);  // dpkit-export writes the profile into every bundle
  EXPECT_EQ(m.tensorrt_cache_dir, "trt_cache");
  EXPECT_EQ(m.tensorrt_min_batch, 1);
  EXPECT_EQ(m.tensorrt_opt_batch, 8);
  EXPECT_EQ(m.tensorrt_max_batch, 64);
  EXPECT_EQ(m.tensorrt_precision, "fp32");
  EXPECT_FALSE(m.tensorrt_engines);
  json j = bundle_manifest("lowdim");
  j["models"]["denoiser"]["dtype"] = "float16";  // --fp16 graphs keep float32 inputs and outputs
  j["models"]["denoiser"]["precision"] = "fp16";
  j["tensorrt"] = {{"cache_dir", "engines"}, {"min_batch", 2}, {"opt_batch", 4}, {"max_batch", 16},
                   {"precision", "fp16"}, {"engines", true}};
  const d::Manifest e = d::parse_manifest(j.dump(), "x");
  EXPECT_EQ(e.denoiser.dtype, "float16");
  EXPECT_EQ(e.tensorrt_cache_dir, "engines");
  EXPECT_EQ(e.tensorrt_min_batch, 2);
  EXPECT_EQ(e.tensorrt_opt_batch, 4);
  EXPECT_EQ(e.tensorrt_max_batch, 16);
  EXPECT_TRUE(e.tensorrt_engines);
  j.erase("tensorrt");  // optional: without it, runtimes give TensorRT no profile
  EXPECT_FALSE(d::parse_manifest(j.dump(), "x").has_tensorrt);
  j["tensorrt"] = {{"cache_dir", "trt_cache"}};
  EXPECT_NE(parse_error(j).find("tensorrt.min_batch is missing"), std::string::npos) << parse_error(j);
}

TEST(Manifest, OnnxInfo) {
  const d::OnnxInfo den = d::read_onnx_info((kGolden / "bundle" / "denoiser.onnx").string());
  ASSERT_EQ(den.inputs.size(), 3u);
  EXPECT_EQ(den.inputs[0], (d::OnnxInfo::Io{"sample", 1, {-1, 16, 2}}));
  EXPECT_EQ(den.inputs[1], (d::OnnxInfo::Io{"timestep", 7, {-1}}));
  EXPECT_EQ(std::get<0>(den.outputs.at(0)), "noise_pred");
  EXPECT_TRUE(den.external.empty());
  const d::OnnxInfo ext = d::read_onnx_info((kGolden / "bundle_external" / "denoiser.onnx").string());
  EXPECT_EQ(ext.external, (std::set<std::string>{"denoiser.onnx.data"}));
  EXPECT_EQ(ext.inputs, den.inputs);
  // The precision derived from the graph (nodes and tensors), and its wording (the one home of both).
  EXPECT_GT(den.op_types.at("Conv"), 0);
  EXPECT_EQ(den.tensor_types.at(1), 40);  // float32 initializers (and no Constant tensors)
  EXPECT_EQ(d::graph_precision(den),
            (std::pair<std::string, std::string>{"fp32", "no integer quantization nodes, no int8/uint8 or float16 tensors"}));
  EXPECT_EQ(d::graph_precision(ext).first, "fp32");
  d::OnnxInfo q;
  q.op_types = {{"MatMulInteger", 2}, {"DynamicQuantizeLinear", 2}, {"Mul", 5}};
  q.tensor_types = {{1, 3}, {3, 4}};
  EXPECT_EQ(d::graph_precision(q), (std::pair<std::string, std::string>{
                                       "int8", "4 integer quantization nodes: DynamicQuantizeLinear, MatMulInteger; 4 int8/uint8 tensors"}));
  q.op_types = {{"QLinearAdd", 1}};
  q.tensor_types = {};
  EXPECT_EQ(d::graph_precision(q).second, "1 integer quantization nodes: QLinearAdd");
  q.op_types = {{"Cast", 1}};
  q.tensor_types = {{1, 2}, {10, 3}};
  EXPECT_EQ(d::graph_precision(q),
            (std::pair<std::string, std::string>{"fp16", "3 float16 tensors, no integer quantization nodes"}));
  q.tensor_types = {{2, 1}};
  EXPECT_EQ(d::graph_precision(q), (std::pair<std::string, std::string>{"int8", "1 int8/uint8 tensors"}));
  // An fp32 graph may carry the label fp16 only when --fp16 had nothing to convert (no matrix product or
  // convolution: the low-dim encoder); every other disagreement is refused.
  const d::OnnxInfo enc = d::read_onnx_info((kGolden / "bundle" / "encoder.onnx").string());
  EXPECT_TRUE(d::precision_fits("fp16", "fp32", enc));
  EXPECT_FALSE(d::precision_fits("int8", "fp32", enc));
  EXPECT_FALSE(d::precision_fits("fp16", "fp32", den));
  EXPECT_FALSE(d::precision_fits("fp32", "fp16", den));
  EXPECT_FALSE(d::precision_fits("fp32", "int8", den));
  EXPECT_TRUE(d::precision_fits("int8", "int8", den));
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
