// The one bundle reader: policy.json -> Manifest, with every check a reader of format version 1 must make
// (docs/bundle-format.md), and the bundle's file rules (files inside the folder, external data listed, graph
// inputs/outputs and precision, sha256). dpkit.runtime.bundle is a typed view over what this reader accepted
// (read_bundle, through the pybind module); cpp/tests/data/damaged_bundles.json is the table of damaged
// bundles it refuses, run by cpp/tests/test_manifest.cpp and, through Python, tests/test_bundle_contract.py.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "internal.hpp"
#include "manifest.hpp"

namespace dpkit {
namespace detail {
namespace {

// ordered: read_bundle hands the validated document back in the file's key order.
using json = nlohmann::ordered_json;

// Bounds applied before anything is sized from the manifest (docs/bundle-format.md, "Limits"); the one
// home of these numbers (bundle_limits() hands them to Python).
constexpr int kMaxJsonDepth = 64;
constexpr int64_t kMaxNObsSteps = 256, kMaxHorizon = 4096, kMaxActionDim = 256, kMaxCondDim = 1 << 20;
constexpr std::size_t kMaxObservations = 64, kMaxObsDims = 8;
constexpr int64_t kMaxObsSize = 1 << 16;
constexpr double kMaxObsFloats = double(1 << 26);
constexpr int64_t kMaxTrainTimesteps = 10000;
constexpr std::size_t kMaxSamplers = 1024, kMaxExternalFiles = 64;
constexpr int64_t kMaxTrtBatch = 65536;

// Deepest bracket nesting outside strings, found before parsing (the same scan as dpkit.io.json_depth).
int json_depth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

bool plain_name(const std::string& s) {
  return !s.empty() && s.size() <= 255 && s != "." && s != ".." && s.find_first_of(std::string("/\\\0", 3)) == std::string::npos;
}

// Typed access that turns every missing key or wrong value into one message naming the key path.
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

  int64_t integer(const json& obj, const std::string& key, const std::string& path, int64_t lo, int64_t hi) const {
    const json& v = at(obj, key, path);
    if (!v.is_number_integer()) fail(join(path, key), "must be an integer");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(join(path, key), "must be <= " + std::to_string(hi) + ", got " + v.dump());
    const int64_t i = v.get<int64_t>();
    if (i < lo) fail(join(path, key), "must be >= " + std::to_string(lo) + ", got " + std::to_string(i));
    if (i > hi) fail(join(path, key), "must be <= " + std::to_string(hi) + ", got " + std::to_string(i));
    return i;
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

  // n numbers, each finite (as T: a float list refuses what float32 cannot hold), integers for integral T.
  template <class T>
  std::vector<T> numbers(const json& obj, const std::string& key, const std::string& path, std::size_t n) const {
    const json& v = at(obj, key, path);
    if (!v.is_array() || v.size() != n)
      fail(join(path, key), "must be a list of " + std::to_string(n) + " numbers");
    std::vector<T> out;
    out.reserve(n);
    for (const json& e : v) {
      if (!e.is_number() || !std::isfinite(e.get<double>()) ||
          (std::is_floating_point<T>::value && !std::isfinite(static_cast<T>(e.get<double>()))))
        fail(join(path, key), "must hold finite numbers only");
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

  std::string name(const json& obj, const std::string& key, const std::string& path, const char* what = "file") const {
    const std::string s = str(obj, key, path);
    if (!plain_name(s))
      fail(join(path, key), std::string("must be a plain ") + what + " name inside the bundle, got " + in_quotes(s));
    return s;
  }

  std::string sha256(const json& obj, const std::string& key, const std::string& path) const {
    const std::string s = str(obj, key, path);
    if (s.size() != 64 || s.find_first_not_of("0123456789abcdef") != std::string::npos)
      fail(join(path, key), "must be 64 lowercase hex digits");
    return s;
  }

  static std::string join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

 private:
  std::string where_;
};

std::string list_str(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& o : v) s += (s.empty() ? "" : ", ") + o;
  return s;
}

// `precision` (optional; default from dtype) and the `quantization` block of int8 graphs.
void read_precision(const Reader& r, const json& m, const std::string& path, ModelEntry& e) {
  e.precision = e.dtype == "float16" ? "fp16" : "fp32";
  e.precision_declared = m.contains("precision");
  if (m.contains("precision")) {
    e.precision = r.str(m, "precision", path);
    if (e.precision != "fp32" && e.precision != "fp16" && e.precision != "int8")
      r.fail(path + ".precision", "must be \"fp32\", \"fp16\" or \"int8\", got " + in_quotes(e.precision));
    if ((e.precision == "fp16") != (e.dtype == "float16"))
      r.fail(path + ".precision", in_quotes(e.precision) + " does not match dtype " + in_quotes(e.dtype));
  }
  const std::string qpath = path + ".quantization";
  if (e.precision != "int8") {
    if (m.contains("quantization")) r.fail(qpath, "is only allowed with precision \"int8\"");
    return;
  }
  const json& q = r.at(m, "quantization", path);
  if (!q.is_object()) r.fail(qpath, "must be an object");
  const std::string method = r.str(q, "method", qpath);
  if (method != "dynamic" && method != "static")
    r.fail(qpath + ".method", "must be \"dynamic\" or \"static\", got " + in_quotes(method));
  r.boolean(q, "per_channel", qpath);
  if (r.strings(q, "op_types", qpath).empty()) r.fail(qpath + ".op_types", "must name at least one op type");
  r.integer(q, "nodes_quantized", qpath, 1, 1 << 30);
  r.str(q, "onnxruntime_version", qpath);
}

ModelEntry read_model(const Reader& r, const json& models, const std::string& name,
                      const std::vector<std::string>& outputs,
                      std::vector<std::pair<std::string, std::string>>& external) {
  const std::string path = "models." + name;
  const json& m = r.at(models, name, "models");
  ModelEntry e;
  e.file = r.name(m, "file", path);
  e.sha256 = r.sha256(m, "sha256", path);
  e.inputs = r.strings(m, "inputs", path);
  e.outputs = r.strings(m, "outputs", path);
  if (e.outputs != outputs) r.fail(path + ".outputs", "must be [" + list_str(outputs) + "]");
  e.dtype = r.str(m, "dtype", path);
  // float16 graphs (dpkit-export --fp16) still take and return float32: the casts are inside the graph.
  if (e.dtype != "float32" && e.dtype != "float16")
    r.fail(path + ".dtype", "must be \"float32\" or \"float16\", got \"" + e.dtype + "\"");
  read_precision(r, m, path, e);
  auto ext = m.find("external_data");
  if (ext != m.end()) {
    if (!ext->is_array() || ext->size() > kMaxExternalFiles)
      r.fail(path + ".external_data", "must be a list of at most " + std::to_string(kMaxExternalFiles) + " {file, sha256} entries");
    std::set<std::string> seen = {e.file};
    for (std::size_t i = 0; i < ext->size(); ++i) {
      const std::string epath = path + ".external_data[" + std::to_string(i) + "]";
      const std::string f = r.name((*ext)[i], "file", epath);
      if (!seen.insert(f).second) r.fail(epath + ".file", in_quotes(f) + " is listed twice");
      external.emplace_back(f, r.sha256((*ext)[i], "sha256", epath));
    }
  }
  return e;
}

void read_scheduler(const Reader& r, const json& s, Manifest& m) {
  const std::string sp = "scheduler";
  if (r.str(s, "type", sp) != "ddpm") r.fail("scheduler.type", "must be \"ddpm\"");
  m.num_train_timesteps = static_cast<int>(r.integer(s, "num_train_timesteps", sp, 1, kMaxTrainTimesteps));
  // what the denoiser outputs; bundles written before "sample" existed always said "epsilon"
  m.prediction_type = s.contains("prediction_type") ? r.str(s, "prediction_type", sp) : "epsilon";
  if (m.prediction_type != "epsilon" && m.prediction_type != "sample")
    r.fail("scheduler.prediction_type", "must be \"epsilon\" or \"sample\", got " + in_quotes(m.prediction_type));
  m.variance_type = r.str(s, "variance_type", sp);
  if (m.variance_type != "fixed_small") r.fail("scheduler.variance_type", "must be \"fixed_small\", got \"" + m.variance_type + "\"");
  m.clip_sample = r.boolean(s, "clip_sample", sp);
  m.clip_sample_range = r.number(s, "clip_sample_range", sp);
  if (!(m.clip_sample_range > 0.0)) r.fail("scheduler.clip_sample_range", "must be a finite number > 0");
  const std::size_t T = static_cast<std::size_t>(m.num_train_timesteps);
  m.betas = r.numbers<double>(s, "betas", sp, T);
  m.alphas_cumprod = r.numbers<double>(s, "alphas_cumprod", sp, T);
  for (double a : m.alphas_cumprod)
    if (!(a > 0.0 && a < 1.0)) r.fail("scheduler.alphas_cumprod", "must hold values in (0, 1)");

  const json& samplers = r.at(s, "samplers", sp);
  if (!samplers.is_array() || samplers.empty()) r.fail("scheduler.samplers", "must be a non-empty list");
  if (samplers.size() > kMaxSamplers) r.fail("scheduler.samplers", "must have at most " + std::to_string(kMaxSamplers) + " entries");
  const std::string default_name = r.str(s, "default_sampler", sp);
  m.default_sampler = -1;
  std::set<std::string> names;
  for (std::size_t i = 0; i < samplers.size(); ++i) {
    const std::string path = "scheduler.samplers[" + std::to_string(i) + "]";
    const json& e = samplers[i];
    SamplerEntry se;
    se.name = r.str(e, "name", path);
    if (!names.insert(se.name).second) r.fail(path + ".name", in_quotes(se.name) + " is listed twice");
    se.sampler = r.str(e, "sampler", path);
    if (se.sampler != "ddpm" && se.sampler != "ddim" && se.sampler != "fewstep")
      r.fail(path + ".sampler", "must be \"ddpm\", \"ddim\" or \"fewstep\", got \"" + se.sampler + "\"");
    se.num_inference_steps = static_cast<int>(r.integer(e, "num_inference_steps", path, 1, m.num_train_timesteps));
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
    if (!(se.final_alpha_cumprod > 0.0 && se.final_alpha_cumprod <= 1.0)) r.fail(path + ".final_alpha_cumprod", "must lie in (0, 1]");
    if (se.sampler == "fewstep") {  // x0 re-noised to the next listed timestep; x0 itself after the last
      for (std::size_t k = 0; k < K; ++k)
        if (se.prev_timesteps[k] != (k + 1 < K ? se.timesteps[k + 1] : -1))
          r.fail(path + ".prev_timesteps", "of a fewstep sampler must be its timesteps[1:] then -1");
      if (se.final_alpha_cumprod != 1.0)
        r.fail(path + ".final_alpha_cumprod", "of a fewstep sampler must be 1.0 (its last step returns x0)");
    }
    se.eta = r.number(e, "eta", path);
    if (se.eta != 0.0) r.fail(path + ".eta", "must be 0.0 in format version 1");
    if (se.name == default_name) m.default_sampler = static_cast<int>(i);
    m.samplers.push_back(se);
  }
  if (m.default_sampler < 0) r.fail("scheduler.default_sampler", in_quotes(default_name) + " names no entry of scheduler.samplers");
}

// ---- the .onnx protobuf walk (the one walk: _core.read_onnx_info hands it to Python) -------------------

struct Malformed {};

enum class Kind { None, Model, Graph, Subgraph, Node, Attribute, Function, Training, Sparse, Tensor, Input, Output };

Kind child(Kind k, uint64_t field) {
  switch (k) {
    case Kind::Model: return field == 7 ? Kind::Graph : field == 20 ? Kind::Training : field == 25 ? Kind::Function : Kind::None;
    case Kind::Graph:
      if (field == 11) return Kind::Input;
      if (field == 12) return Kind::Output;
      [[fallthrough]];
    case Kind::Subgraph: return field == 1 ? Kind::Node : field == 5 ? Kind::Tensor : field == 15 ? Kind::Sparse : Kind::None;
    case Kind::Node: return field == 5 ? Kind::Attribute : Kind::None;
    case Kind::Attribute:
      return (field == 5 || field == 10) ? Kind::Tensor : (field == 6 || field == 11) ? Kind::Subgraph
             : (field == 22 || field == 23) ? Kind::Sparse : Kind::None;
    case Kind::Function: return field == 7 ? Kind::Node : field == 11 ? Kind::Attribute : Kind::None;
    case Kind::Training: return (field == 1 || field == 2) ? Kind::Subgraph : Kind::None;
    case Kind::Sparse: return (field == 1 || field == 2) ? Kind::Tensor : Kind::None;
    default: return Kind::None;
  }
}

constexpr int kMaxNesting = 32;

uint64_t varint(const uint8_t*& p, const uint8_t* end) {
  uint64_t result = 0;
  for (int shift = 0; shift <= 63; shift += 7) {
    if (p >= end) throw Malformed{};
    const uint8_t b = *p++;
    result |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (b < 0x80) return result;
  }
  throw Malformed{};
}

// Calls f(field, wire, value, begin, end) for each field of the message [p, end); value is the varint
// (wire 0), begin/end the bytes (wire 2).
template <class F>
void fields(const uint8_t* p, const uint8_t* end, F f) {
  while (p < end) {
    const uint64_t key = varint(p, end);
    const uint64_t num = key >> 3, wire = key & 7;
    if (wire == 0) {
      const uint64_t v = varint(p, end);
      f(num, wire, v, p, p);
    } else if (wire == 2) {
      const uint64_t n = varint(p, end);
      if (n > static_cast<uint64_t>(end - p)) throw Malformed{};
      f(num, wire, 0, p, p + n);
      p += n;
    } else if (wire == 1 || wire == 5) {
      const std::size_t n = wire == 1 ? 8 : 4;
      if (n > static_cast<std::size_t>(end - p)) throw Malformed{};
      p += n;
    } else {
      throw Malformed{};  // groups are not used by ONNX
    }
  }
}

std::string text(const uint8_t* b, const uint8_t* e) { return std::string(reinterpret_cast<const char*>(b), static_cast<std::size_t>(e - b)); }

struct Walk {
  OnnxInfo info;
  std::set<std::string> initializers;
  std::vector<OnnxInfo::Io> all_inputs;

  void tensor(const uint8_t* b, const uint8_t* e, bool top) {
    bool external = false, has_location = false;
    std::string location, name;
    bool has_name = false;
    int dtype = 0;
    fields(b, e, [&](uint64_t num, uint64_t wire, uint64_t v, const uint8_t* s, const uint8_t* t) {
      if (num == 2 && wire == 0) {  // data_type
        dtype = static_cast<int>(v);
      } else if (num == 14 && wire == 0) {
        external = external || v == 1;
      } else if (num == 13 && wire == 2) {
        external = true;
        std::string key, value;
        fields(s, t, [&](uint64_t n2, uint64_t w2, uint64_t, const uint8_t* s2, const uint8_t* t2) {
          if (w2 == 2 && n2 == 1) key = text(s2, t2);
          else if (w2 == 2 && n2 == 2) value = text(s2, t2);
        });
        if (key == "location") {
          location = value;
          has_location = true;
        }
      } else if (num == 8 && wire == 2) {
        name = text(s, t);
        has_name = true;
      }
    });
    if (external) info.external.insert(has_location ? location : "");
    ++info.tensor_types[dtype];
    if (top && has_name) initializers.insert(name);
  }

  static OnnxInfo::Io value_info(const uint8_t* b, const uint8_t* e) {
    std::string name;
    int elem = 0;
    std::vector<int64_t> dims;
    fields(b, e, [&](uint64_t num, uint64_t wire, uint64_t, const uint8_t* s, const uint8_t* t) {
      if (num == 1 && wire == 2) name = text(s, t);
      if (num != 2 || wire != 2) return;
      fields(s, t, [&](uint64_t n2, uint64_t w2, uint64_t, const uint8_t* s2, const uint8_t* t2) {  // TypeProto
        if (n2 != 1 || w2 != 2) return;
        fields(s2, t2, [&](uint64_t n3, uint64_t w3, uint64_t v3, const uint8_t* s3, const uint8_t* t3) {  // Tensor
          if (n3 == 1 && w3 == 0) elem = static_cast<int>(v3);
          if (n3 != 2 || w3 != 2) return;
          fields(s3, t3, [&](uint64_t n4, uint64_t w4, uint64_t, const uint8_t* s4, const uint8_t* t4) {  // dim
            if (n4 != 1 || w4 != 2) return;
            int64_t value = -1;
            fields(s4, t4, [&](uint64_t n5, uint64_t w5, uint64_t v5, const uint8_t*, const uint8_t*) {
              if (n5 == 1 && w5 == 0) value = static_cast<int64_t>(v5);
            });
            dims.push_back(value);
          });
        });
      });
    });
    return {name, elem, dims};
  }

  void walk(const uint8_t* b, const uint8_t* e, Kind kind, int depth) {
    if (depth > kMaxNesting) throw Malformed{};
    fields(b, e, [&](uint64_t num, uint64_t wire, uint64_t, const uint8_t* s, const uint8_t* t) {
      if (kind == Kind::Node && num == 4 && wire == 2) {  // NodeProto.op_type
        ++info.op_types[text(s, t)];
        return;
      }
      const Kind sub = child(kind, num);
      if (sub == Kind::None || wire != 2) return;
      if (sub == Kind::Tensor) tensor(s, t, kind == Kind::Graph);
      else if (sub == Kind::Input) all_inputs.push_back(value_info(s, t));
      else if (sub == Kind::Output) info.outputs.push_back(value_info(s, t));
      else walk(s, t, sub, depth + 1);
    });
  }
};

std::string dtype_name(int elem) {
  switch (elem) {
    case 1: return "float32";
    case 7: return "int64";
    case 10: return "float16";
    case 11: return "float64";
    case 6: return "int32";
    default: return std::to_string(elem);
  }
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + (dims[i] < 0 ? std::string("B") : std::to_string(dims[i]));
  return s + ")";
}

// What is wrong with a graph's declared inputs/outputs ("" = nothing). The "ort" backend words its check of
// the sessions it opened the same (dpkit.runtime.bundle.graph_io_problem).
std::string graph_io_problem(const Manifest& m, bool encoder, const OnnxInfo& g) {
  using Io = OnnxInfo::Io;
  std::vector<Io> want_in, want_out;
  const int64_t To = m.n_obs_steps, H = m.horizon, A = m.action_dim, C = m.cond_dim;
  if (encoder) {
    for (const auto& o : m.observations) {
      std::vector<int64_t> dims = {-1, To};
      dims.insert(dims.end(), o.shape.begin(), o.shape.end());
      want_in.emplace_back(o.name, 1, dims);
    }
    want_out.emplace_back("cond", 1, std::vector<int64_t>{-1, C});
  } else {
    want_in = {Io{"sample", 1, {-1, H, A}}, Io{"timestep", 7, {-1}}, Io{"cond", 1, {-1, C}}};
    want_out = {Io{"noise_pred", 1, {-1, H, A}}};
  }
  if (g.inputs.size() != want_in.size() || g.outputs.size() != want_out.size())
    return "has " + std::to_string(g.inputs.size()) + " inputs and " + std::to_string(g.outputs.size()) +
           " outputs, expected " + std::to_string(want_in.size()) + " and " + std::to_string(want_out.size()) + " (policy.json)";
  for (int pass = 0; pass < 2; ++pass) {
    const std::string kind = pass == 0 ? "input" : "output";
    const auto& got = pass == 0 ? g.inputs : g.outputs;
    const auto& want = pass == 0 ? want_in : want_out;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const auto& [name, elem, dims] = got[i];
      const auto& [w_name, w_elem, w_dims] = want[i];
      if (name != w_name) return kind + " " + std::to_string(i) + " is named '" + name + "', expected '" + w_name + "'";
      if (elem != w_elem)
        return kind + " '" + name + "' has element type " + dtype_name(elem) + ", expected " + dtype_name(w_elem);
      bool ok = dims.size() == w_dims.size();
      for (std::size_t d = 0; ok && d < dims.size(); ++d) ok = dims[d] < 0 || w_dims[d] < 0 || dims[d] == w_dims[d];
      if (!ok) return kind + " '" + name + "' has shape " + shape_str(dims) + ", expected " + shape_str(w_dims);
    }
  }
  return "";
}

std::string real_path(const std::string& path) {
  std::unique_ptr<char, void (*)(void*)> r(::realpath(path.c_str(), nullptr), std::free);
  return r ? std::string(r.get()) : std::string();
}

// The file rules of load_manifest: every named file exists, is a regular file and stays inside the
// bundle folder (symlinks resolved); graphs reference only listed external data; inputs/outputs match.
void check_files(const Manifest& m, const std::string& dir, const Reader& r) {
  const std::string root = real_path(dir);
  for (int g = 0; g < 2; ++g) {
    const std::string graph = g == 0 ? "encoder" : "denoiser";
    const ModelEntry& e = g == 0 ? m.encoder : m.denoiser;
    const auto& ext = g == 0 ? m.encoder_external_data : m.denoiser_external_data;
    std::vector<std::pair<std::string, std::string>> named = {{"models." + graph + ".file", e.file}};
    for (std::size_t i = 0; i < ext.size(); ++i)
      named.emplace_back("models." + graph + ".external_data[" + std::to_string(i) + "].file", ext[i].first);
    for (const auto& [key, name] : named) {
      const std::string path = dir + "/" + name;
      struct stat st;
      if (::stat(path.c_str(), &st) != 0) r.fail(key, in_quotes(name) + " does not exist in the bundle folder");
      const std::string real = real_path(path);
      if (root.empty() || real.compare(0, root.size() + 1, root + "/") != 0)
        r.fail(key, in_quotes(name) + " resolves outside the bundle folder");
      if (!S_ISREG(st.st_mode)) r.fail(key, in_quotes(name) + " is not a regular file");
    }
    OnnxInfo info;
    try {
      info = read_onnx_info(dir + "/" + e.file);
    } catch (const Error& err) {
      const std::string msg = err.what(), prefix = dir + "/" + e.file + " ";
      r.fail("models." + graph + ".file", in_quotes(e.file) + " " + (msg.rfind(prefix, 0) == 0 ? msg.substr(prefix.size()) : msg));
    }
    std::set<std::string> listed;
    for (const auto& x : ext) listed.insert(x.first);
    for (const auto& loc : info.external)
      if (!listed.count(loc))
        r.fail("models." + graph + ".file", in_quotes(e.file) + " references external data " + in_quotes(loc) + " that models." +
                                                graph + ".external_data does not list (every byte a graph loads must be hashed)");
    const std::string problem = graph_io_problem(m, g == 0, info);
    if (!problem.empty()) r.fail("models." + graph + ".file", in_quotes(e.file) + ": " + problem);
    // The declared precision (or the one dtype implies) must be what the graph is: not taken on trust.
    const auto [derived, evidence] = graph_precision(info);
    if (!precision_fits(e.precision, derived, info)) {
      const std::string label = e.precision_declared ? in_quotes(e.precision)
                                                     : "(missing; " + in_quotes(e.precision) + " from dtype " + in_quotes(e.dtype) + ")";
      r.fail("models." + graph + ".precision",
             label + " does not match the graph: " + e.file + " is " + derived + " (" + evidence + ")");
    }
  }
}

bool is_quant_op(const std::string& op) {
  static const std::set<std::string> ops = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                                            "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
                                            "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
                                            "QAttention", "DynamicQuantizeLSTM"};
  return ops.count(op) > 0 || op.rfind("QLinear", 0) == 0;
}

}  // namespace

std::pair<std::string, std::string> graph_precision(const OnnxInfo& info) {
  constexpr int kUint8 = 2, kInt8 = 3, kFloat16 = 10;
  auto count = [&](int t) {
    auto it = info.tensor_types.find(t);
    return it == info.tensor_types.end() ? int64_t(0) : it->second;
  };
  int64_t n_quant = 0;
  std::string quant;
  for (const auto& [op, n] : info.op_types)
    if (is_quant_op(op)) {
      n_quant += n;
      quant += (quant.empty() ? "" : ", ") + op;
    }
  const int64_t n_int8 = count(kInt8) + count(kUint8), n_fp16 = count(kFloat16);
  if (n_quant || n_int8) {
    std::string parts;
    if (n_quant) parts = std::to_string(n_quant) + " integer quantization nodes: " + quant;
    if (n_int8) parts += (parts.empty() ? "" : "; ") + std::to_string(n_int8) + " int8/uint8 tensors";
    return {"int8", parts};
  }
  if (n_fp16) return {"fp16", std::to_string(n_fp16) + " float16 tensors, no integer quantization nodes"};
  return {"fp32", "no integer quantization nodes, no int8/uint8 or float16 tensors"};
}

bool precision_fits(const std::string& declared, const std::string& derived, const OnnxInfo& info) {
  if (declared == derived) return true;
  if (declared != "fp16" || derived != "fp32") return false;
  for (const char* op : {"MatMul", "Gemm", "Conv", "ConvTranspose"})
    if (info.op_types.count(op)) return false;
  return true;
}

OnnxInfo read_onnx_info(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + " cannot be read (" + std::strerror(errno) + ")");
  struct stat st;
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) {
    ::close(fd);
    throw Error(path + " is not a valid ONNX model (malformed protobuf)");
  }
  const std::size_t size = static_cast<std::size_t>(st.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw Error(path + " cannot be read (" + std::strerror(errno) + ")");
  struct Unmap {
    void* p;
    std::size_t n;
    ~Unmap() { ::munmap(p, n); }
  } unmap{map, size};
  const uint8_t* b = static_cast<const uint8_t*>(map);
  Walk w;
  try {
    w.walk(b, b + size, Kind::Model, 0);
  } catch (const Malformed&) {
    throw Error(path + " is not a valid ONNX model (malformed protobuf)");
  }
  for (auto& io : w.all_inputs)
    if (!w.initializers.count(std::get<0>(io))) w.info.inputs.push_back(std::move(io));
  return std::move(w.info);
}

namespace {

// policy.json text -> the JSON document (depth bound first: the parser recurses), or one-line Error.
json parse_json(const std::string& text, const std::string& where) {
  if (json_depth(text) > kMaxJsonDepth)
    throw Error(where + ": JSON nesting is deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse errors, and numbers beyond double range ("1e999")
    throw Error(where + ": not valid JSON (" + e.what() + ")");
  }
  return j;
}

// The manifest rules, in order, on a parsed document.
Manifest read_manifest(const json& j, const std::string& where) {
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
  m.n_obs_steps = static_cast<int>(r.integer(j, "n_obs_steps", "", 1, kMaxNObsSteps));
  m.horizon = static_cast<int>(r.integer(j, "horizon", "", 1, kMaxHorizon));
  m.n_action_steps = static_cast<int>(r.integer(j, "n_action_steps", "", 1, kMaxHorizon));
  m.action_dim = static_cast<int>(r.integer(j, "action_dim", "", 1, kMaxActionDim));
  m.first_action_index = static_cast<int>(r.integer(j, "first_action_index", "", 0, kMaxHorizon));
  m.cond_dim = static_cast<int>(r.integer(j, "cond_dim", "", 1, kMaxCondDim));
  if (m.first_action_index != m.n_obs_steps - 1)
    r.fail("first_action_index", "must be n_obs_steps - 1 (" + std::to_string(m.n_obs_steps - 1) + "), got " +
                                     std::to_string(m.first_action_index));
  if (m.first_action_index + m.n_action_steps > m.horizon)
    r.fail("first_action_index", "+ n_action_steps (" + std::to_string(m.first_action_index) + " + " +
                                     std::to_string(m.n_action_steps) + ") exceeds horizon " + std::to_string(m.horizon));

  const json& obs = r.at(j, "observations", "");
  if (!obs.is_array() || obs.empty()) r.fail("observations", "must be a non-empty list");
  if (obs.size() > kMaxObservations) r.fail("observations", "must have at most " + std::to_string(kMaxObservations) + " entries");
  std::set<std::string> obs_names;
  for (std::size_t i = 0; i < obs.size(); ++i) {
    const std::string path = "observations[" + std::to_string(i) + "]";
    ObservationInfo o;
    o.name = r.str(obs[i], "name", path);
    if (o.name.empty() || !obs_names.insert(o.name).second)
      r.fail(path + ".name", "must be a unique non-empty string, got " + in_quotes(o.name));
    const json& shape = r.at(obs[i], "shape", path);
    bool ints = shape.is_array() && !shape.empty() && shape.size() <= kMaxObsDims;
    for (std::size_t k = 0; ints && k < shape.size(); ++k) ints = shape[k].is_number_integer();
    if (!ints) r.fail(path + ".shape", "must be a list of 1 to " + std::to_string(kMaxObsDims) + " integers");
    double floats = m.n_obs_steps;
    for (const json& d : shape) {
      if (d.is_number_unsigned() ? (d.get<uint64_t>() < 1 || d.get<uint64_t>() > static_cast<uint64_t>(kMaxObsSize))
                                 : (d.get<int64_t>() < 1 || d.get<int64_t>() > kMaxObsSize))
        r.fail(path + ".shape", "must hold sizes in [1, " + std::to_string(kMaxObsSize) + "]");
      o.shape.push_back(d.get<int64_t>());
      floats *= static_cast<double>(o.shape.back());
    }
    if (floats > kMaxObsFloats)
      r.fail(path + ".shape", "holds more than " + std::to_string(static_cast<int64_t>(kMaxObsFloats)) +
                                  " floats per sample (with n_obs_steps)");
    o.step_size = 1;
    for (int64_t d : o.shape) o.step_size *= static_cast<std::size_t>(d);
    if (r.str(obs[i], "dtype", path) != "float32") r.fail(path + ".dtype", "must be \"float32\"");
    m.observations.push_back(o);
  }

  const json& norm = r.at(j, "action_normalizer", "");
  const std::size_t A = static_cast<std::size_t>(m.action_dim);
  m.action_scale = r.numbers<float>(norm, "scale", "action_normalizer", A);
  m.action_offset = r.numbers<float>(norm, "offset", "action_normalizer", A);
  for (float s : m.action_scale)
    if (s == 0.0f) r.fail("action_normalizer.scale", "must not contain 0");

  read_scheduler(r, r.at(j, "scheduler", ""), m);

  const json& models = r.at(j, "models", "");
  m.encoder = read_model(r, models, "encoder", {"cond"}, m.encoder_external_data);
  m.denoiser = read_model(r, models, "denoiser", {"noise_pred"}, m.denoiser_external_data);
  std::vector<std::string> names;
  for (const auto& o : m.observations) names.push_back(o.name);
  if (m.encoder.inputs != names) r.fail("models.encoder.inputs", "must list the observations' names in order");
  if (m.denoiser.inputs != std::vector<std::string>{"sample", "timestep", "cond"})
    r.fail("models.denoiser.inputs", "must be [sample, timestep, cond]");

  auto trt = j.find("tensorrt");
  if (trt != j.end() && !trt->is_null()) {
    m.has_tensorrt = true;
    m.tensorrt_cache_dir = r.name(*trt, "cache_dir", "tensorrt", "folder");
    m.tensorrt_min_batch = static_cast<int>(r.integer(*trt, "min_batch", "tensorrt", 1, kMaxTrtBatch));
    m.tensorrt_opt_batch = static_cast<int>(r.integer(*trt, "opt_batch", "tensorrt", 1, kMaxTrtBatch));
    m.tensorrt_max_batch = static_cast<int>(r.integer(*trt, "max_batch", "tensorrt", 1, kMaxTrtBatch));
    if (m.tensorrt_opt_batch < m.tensorrt_min_batch || m.tensorrt_opt_batch > m.tensorrt_max_batch)
      r.fail("tensorrt.opt_batch", "must lie in [min_batch, max_batch] = [" + std::to_string(m.tensorrt_min_batch) + ", " +
                                       std::to_string(m.tensorrt_max_batch) + "], got " + std::to_string(m.tensorrt_opt_batch));
    m.tensorrt_precision = r.str(*trt, "precision", "tensorrt");
    if (m.tensorrt_precision != "fp32" && m.tensorrt_precision != "fp16")
      r.fail("tensorrt.precision", "must be \"fp32\" or \"fp16\"");
    m.tensorrt_engines = r.boolean(*trt, "engines", "tensorrt");
  }
  return m;
}

std::string read_text(const std::string& bundle_dir) {
  const std::string path = bundle_dir + "/policy.json";
  struct stat st;
  if (::stat(bundle_dir.c_str(), &st) != 0) throw Error("cannot read " + path + ": bundle " + bundle_dir + " does not exist");
  if (::stat(path.c_str(), &st) != 0)
    throw Error("cannot read " + path + ": " + bundle_dir + " is not a dpkit bundle (no policy.json)");
  std::ifstream f(path);
  if (!f) throw Error("cannot read " + path + " (is " + bundle_dir + " a dpkit bundle folder?)");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

Manifest parse_manifest(const std::string& text, const std::string& where) {
  return read_manifest(parse_json(text, where), where);
}

Manifest load_manifest(const std::string& bundle_dir) {
  const std::string path = bundle_dir + "/policy.json";
  Manifest m = parse_manifest(read_text(bundle_dir), path);
  check_files(m, bundle_dir, Reader(path));
  return m;
}

BundleRead read_bundle(const std::string& bundle_dir, bool check_bundle_files, bool verify_sha256, const Digest& digest) {
  const std::string path = bundle_dir + "/policy.json";
  const json j = parse_json(read_text(bundle_dir), path);  // policy.json is read once
  BundleRead out{read_manifest(j, path), j.dump(-1, ' ', false, json::error_handler_t::replace)};
  if (check_bundle_files) {
    check_files(out.manifest, bundle_dir, Reader(path));
    if (verify_sha256) verify_bundle_sha256(out.manifest, bundle_dir, digest);
  }
  return out;
}

std::vector<std::pair<std::string, int64_t>> bundle_limits() {
  return {{"max_json_depth", kMaxJsonDepth},         {"max_n_obs_steps", kMaxNObsSteps},
          {"max_horizon", kMaxHorizon},              {"max_action_dim", kMaxActionDim},
          {"max_cond_dim", kMaxCondDim},             {"max_observations", int64_t(kMaxObservations)},
          {"max_obs_dims", int64_t(kMaxObsDims)},    {"max_obs_size", kMaxObsSize},
          {"max_obs_floats", int64_t(kMaxObsFloats)}, {"max_train_timesteps", kMaxTrainTimesteps},
          {"max_samplers", int64_t(kMaxSamplers)},   {"max_external_files", int64_t(kMaxExternalFiles)},
          {"max_trt_batch", kMaxTrtBatch}};
}

void verify_bundle_sha256(const Manifest& m, const std::string& bundle_dir, const Digest& digest) {
  const Reader r(bundle_dir + "/policy.json");
  for (int g = 0; g < 2; ++g) {
    const std::string graph = g == 0 ? "encoder" : "denoiser";
    const ModelEntry& e = g == 0 ? m.encoder : m.denoiser;
    const auto& ext = g == 0 ? m.encoder_external_data : m.denoiser_external_data;
    std::vector<std::tuple<std::string, std::string, std::string>> hashed = {{"models." + graph + ".sha256", e.file, e.sha256}};
    for (std::size_t i = 0; i < ext.size(); ++i)
      hashed.emplace_back("models." + graph + ".external_data[" + std::to_string(i) + "].sha256", ext[i].first, ext[i].second);
    for (const auto& [key, name, want] : hashed) {
      const std::string got = digest(bundle_dir + "/" + name);
      if (got != want)
        r.fail(key, "does not match " + name + " (file has " + got.substr(0, 12) + "..., policy.json says " +
                        want.substr(0, 12) + "...): the file was modified or is corrupt; re-export the bundle");
    }
  }
}

}  // namespace detail
}  // namespace dpkit
