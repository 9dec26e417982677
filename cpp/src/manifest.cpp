// policy.json -> Manifest, with every check a reader of format version 1 must make (docs/bundle-format.md).
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"

namespace dpkit {
namespace detail {
namespace {

using nlohmann::json;

// Typed access that turns every missing key or wrong type into one message naming the key path.
class Reader {
 public:
  explicit Reader(const std::string& where) : where_(where) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(where_ + ": " + key + " " + what);
  }

  const json& at(const json& obj, const std::string& key, const std::string& path) const {
    if (!obj.is_object()) fail(path.empty() ? "(top level)" : path, "must be an object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(join(path, key), "is missing");
    return *it;
  }

  std::string str(const json& obj, const std::string& key, const std::string& path = "") const {
    const json& v = at(obj, key, path);
    if (!v.is_string()) fail(join(path, key), "must be a string");
    return v.get<std::string>();
  }

  int integer(const json& obj, const std::string& key, const std::string& path = "", int min = 0) const {
    const json& v = at(obj, key, path);
    if (!v.is_number_integer()) fail(join(path, key), "must be an integer");
    const int64_t i = v.get<int64_t>();
    if (i < min || i > (1 << 30)) fail(join(path, key), "must be >= " + std::to_string(min) + ", got " + std::to_string(i));
    return static_cast<int>(i);
  }

  double number(const json& obj, const std::string& key, const std::string& path = "") const {
    const json& v = at(obj, key, path);
    if (!v.is_number() || !std::isfinite(v.get<double>())) fail(join(path, key), "must be a finite number");
    return v.get<double>();
  }

  bool boolean(const json& obj, const std::string& key, const std::string& path = "") const {
    const json& v = at(obj, key, path);
    if (!v.is_boolean()) fail(join(path, key), "must be true or false");
    return v.get<bool>();
  }

  template <class T>
  std::vector<T> numbers(const json& obj, const std::string& key, const std::string& path, std::size_t n) const {
    const json& v = at(obj, key, path);
    if (!v.is_array() || v.size() != n)
      fail(join(path, key), "must be a list of " + std::to_string(n) + " numbers");
    std::vector<T> out;
    out.reserve(n);
    for (const json& e : v) {
      if (!e.is_number() || !std::isfinite(e.get<double>())) fail(join(path, key), "must hold finite numbers only");
      if (std::is_integral<T>::value && !e.is_number_integer()) fail(join(path, key), "must hold integers only");
      out.push_back(e.get<T>());
    }
    return out;
  }

  std::vector<std::string> strings(const json& obj, const std::string& key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_array()) fail(join(path, key), "must be a list of strings");
    std::vector<std::string> out;
    for (const json& e : v) {
      if (!e.is_string()) fail(join(path, key), "must be a list of strings");
      out.push_back(e.get<std::string>());
    }
    return out;
  }

  static std::string join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

 private:
  std::string where_;
};

ModelEntry read_model(const Reader& r, const json& models, const std::string& name,
                      const std::vector<std::string>& outputs) {
  const std::string path = "models." + name;
  const json& m = r.at(models, name, "models");
  ModelEntry e;
  e.file = r.str(m, "file", path);
  if (e.file.empty() || e.file.find('/') != std::string::npos || e.file.find("..") != std::string::npos)
    r.fail(path + ".file", "must be a plain file name inside the bundle, got '" + e.file + "'");
  e.sha256 = r.str(m, "sha256", path);
  if (e.sha256.size() != 64 || e.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
    r.fail(path + ".sha256", "must be 64 lowercase hex digits");
  e.inputs = r.strings(m, "inputs", path);
  e.outputs = r.strings(m, "outputs", path);
  e.dtype = r.str(m, "dtype", path);
  // float16 graphs (dpkit-export --fp16) still take and return float32: the casts are inside the graph.
  if (e.dtype != "float32" && e.dtype != "float16")
    r.fail(path + ".dtype", "must be \"float32\" or \"float16\", got \"" + e.dtype + "\"");
  if (e.outputs != outputs) {
    std::string want;
    for (const auto& o : outputs) want += (want.empty() ? "" : ", ") + o;
    r.fail(path + ".outputs", "must be [" + want + "]");
  }
  return e;
}

}  // namespace

Manifest parse_manifest(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(where + ": not valid JSON (" + e.what() + ")");
  }
  const Reader r(where);
  if (!j.is_object()) throw Error(where + ": must hold a JSON object");
  if (r.str(j, "format") != "dpkit-bundle") r.fail("format", "must be \"dpkit-bundle\"");
  {
    const json& v = r.at(j, "format_version", "");
    if (!v.is_number_integer() || v.get<int64_t>() != 1)
      r.fail("format_version", "is " + v.dump() + "; this runtime reads format version 1 only (re-export the bundle with a matching dpkit)");
  }

  Manifest m;
  m.obs_mode = r.str(j, "obs_mode");
  if (m.obs_mode != "lowdim" && m.obs_mode != "image") r.fail("obs_mode", "must be \"lowdim\" or \"image\", got \"" + m.obs_mode + "\"");
  m.n_obs_steps = r.integer(j, "n_obs_steps", "", 1);
  m.horizon = r.integer(j, "horizon", "", 1);
  m.n_action_steps = r.integer(j, "n_action_steps", "", 1);
  m.action_dim = r.integer(j, "action_dim", "", 1);
  m.first_action_index = r.integer(j, "first_action_index", "", 0);
  m.cond_dim = r.integer(j, "cond_dim", "", 1);
  if (m.first_action_index + m.n_action_steps > m.horizon)
    r.fail("first_action_index", "+ n_action_steps (" + std::to_string(m.first_action_index) + " + " +
                                     std::to_string(m.n_action_steps) + ") exceeds horizon " + std::to_string(m.horizon));

  const json& obs = r.at(j, "observations", "");
  if (!obs.is_array() || obs.empty()) r.fail("observations", "must be a non-empty list");
  for (std::size_t i = 0; i < obs.size(); ++i) {
    const std::string path = "observations[" + std::to_string(i) + "]";
    ObservationInfo o;
    o.name = r.str(obs[i], "name", path);
    o.shape = r.numbers<int64_t>(obs[i], "shape", path, r.at(obs[i], "shape", path).size());
    o.step_size = 1;
    for (int64_t d : o.shape) {
      if (d < 1) r.fail(path + ".shape", "must hold positive sizes");
      o.step_size *= static_cast<std::size_t>(d);
    }
    if (r.str(obs[i], "dtype", path) != "float32") r.fail(path + ".dtype", "must be \"float32\"");
    m.observations.push_back(o);
  }

  const json& norm = r.at(j, "action_normalizer", "");
  const std::size_t A = static_cast<std::size_t>(m.action_dim);
  m.action_scale = r.numbers<float>(norm, "scale", "action_normalizer", A);
  m.action_offset = r.numbers<float>(norm, "offset", "action_normalizer", A);

  const std::string sp = "scheduler";
  const json& s = r.at(j, "scheduler", "");
  if (r.str(s, "type", sp) != "ddpm") r.fail("scheduler.type", "must be \"ddpm\"");
  m.num_train_timesteps = r.integer(s, "num_train_timesteps", sp, 1);
  m.prediction_type = r.str(s, "prediction_type", sp);
  if (m.prediction_type != "epsilon") r.fail("scheduler.prediction_type", "must be \"epsilon\" in format version 1, got \"" + m.prediction_type + "\"");
  m.variance_type = r.str(s, "variance_type", sp);
  if (m.variance_type != "fixed_small") r.fail("scheduler.variance_type", "must be \"fixed_small\", got \"" + m.variance_type + "\"");
  m.clip_sample = r.boolean(s, "clip_sample", sp);
  m.clip_sample_range = r.number(s, "clip_sample_range", sp);
  const std::size_t T = static_cast<std::size_t>(m.num_train_timesteps);
  m.betas = r.numbers<double>(s, "betas", sp, T);
  m.alphas_cumprod = r.numbers<double>(s, "alphas_cumprod", sp, T);
  for (double a : m.alphas_cumprod)
    if (!(a > 0.0 && a <= 1.0)) r.fail("scheduler.alphas_cumprod", "must hold values in (0, 1]");

  const json& samplers = r.at(s, "samplers", sp);
  if (!samplers.is_array() || samplers.empty()) r.fail("scheduler.samplers", "must be a non-empty list");
  const std::string default_name = r.str(s, "default_sampler", sp);
  m.default_sampler = -1;
  for (std::size_t i = 0; i < samplers.size(); ++i) {
    const std::string path = "scheduler.samplers[" + std::to_string(i) + "]";
    const json& e = samplers[i];
    SamplerEntry se;
    se.name = r.str(e, "name", path);
    se.sampler = r.str(e, "sampler", path);
    if (se.sampler != "ddpm" && se.sampler != "ddim") r.fail(path + ".sampler", "must be \"ddpm\" or \"ddim\", got \"" + se.sampler + "\"");
    se.num_inference_steps = r.integer(e, "num_inference_steps", path, 1);
    const std::size_t K = static_cast<std::size_t>(se.num_inference_steps);
    se.timesteps = r.numbers<int64_t>(e, "timesteps", path, K);
    se.prev_timesteps = r.numbers<int64_t>(e, "prev_timesteps", path, K);
    for (std::size_t k = 0; k < K; ++k) {
      if (se.timesteps[k] < 0 || se.timesteps[k] >= m.num_train_timesteps)
        r.fail(path + ".timesteps", "must lie in [0, num_train_timesteps)");
      if (se.prev_timesteps[k] < -1 || se.prev_timesteps[k] >= se.timesteps[k])
        r.fail(path + ".prev_timesteps", "must lie in [-1, timesteps[k])");
    }
    se.final_alpha_cumprod = r.number(e, "final_alpha_cumprod", path);
    se.eta = r.number(e, "eta", path);
    if (se.eta != 0.0) r.fail(path + ".eta", "must be 0.0 in format version 1");
    if (se.name == default_name) m.default_sampler = static_cast<int>(i);
    m.samplers.push_back(se);
  }
  if (m.default_sampler < 0) r.fail("scheduler.default_sampler", "\"" + default_name + "\" names no entry of scheduler.samplers");

  const json& models = r.at(j, "models", "");
  m.encoder = read_model(r, models, "encoder", {"cond"});
  m.denoiser = read_model(r, models, "denoiser", {"noise_pred"});
  std::vector<std::string> obs_names;
  for (const auto& o : m.observations) obs_names.push_back(o.name);
  if (m.encoder.inputs != obs_names) r.fail("models.encoder.inputs", "must list the observations' names in order");
  if (m.denoiser.inputs != std::vector<std::string>{"sample", "timestep", "cond"})
    r.fail("models.denoiser.inputs", "must be [sample, timestep, cond]");

  auto trt = j.find("tensorrt");
  if (trt != j.end() && !trt->is_null()) {
    m.has_tensorrt = true;
    m.tensorrt_precision = r.str(*trt, "precision", "tensorrt");
    m.tensorrt_max_batch = r.integer(*trt, "max_batch", "tensorrt", 1);
    if (trt->contains("cache_dir")) {
      m.tensorrt_cache_dir = r.str(*trt, "cache_dir", "tensorrt");
      if (m.tensorrt_cache_dir.empty() || m.tensorrt_cache_dir.find('/') != std::string::npos ||
          m.tensorrt_cache_dir.find("..") != std::string::npos)
        r.fail("tensorrt.cache_dir", "must be a plain folder name inside the bundle");
    }
  }
  return m;
}

Manifest load_manifest(const std::string& bundle_dir) {
  const std::string path = bundle_dir + "/policy.json";
  std::ifstream f(path);
  if (!f) throw Error("cannot read " + path + " (is " + bundle_dir + " a dpkit bundle folder?)");
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_manifest(ss.str(), path);
}

}  // namespace detail
}  // namespace dpkit
