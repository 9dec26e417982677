// dpkit.runtime._core: dpkit::Policy and dpkit::RealTimeController for Python. Used through
// dpkit.runtime.cpp_policy.CppPolicy and dpkit.runtime.realtime.make_controller. Also the bundle reader
// alone (read_bundle, read_onnx_info, bundle_limits; cpp/src/manifest.cpp, no ONNX Runtime session): the
// one parser and validator of a bundle, under dpkit.runtime.bundle's typed view.
//
// numpy in: float32 C-contiguous arrays are read in place, other numeric arrays converted once; anything
// else (lists, strings, booleans) is an InputError. Samplers are typed handles from find_sampler.
// numpy out: the result arrays are allocated here and C++ writes into them directly. The GIL is
// released while sampling, so Python threads (one Policy each) run concurrently; calls on one Policy
// from several threads are serialized by its lock (dpkit::Policy itself is one-thread-at-a-time).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <optional>

#include "dpkit/runtime.hpp"
#include "manifest.hpp"  // the reader's internals (cpp/src; built in-tree, not installed)

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

// dpkit::Policy plus the lock that makes one Python object safe to share between threads.
struct PyPolicy {
  PyPolicy(const std::string& dir, const dpkit::PolicyParams& p) : policy(dir, p) {}
  dpkit::Policy policy;
  std::mutex mutex;
};

// Runs fn() with the GIL released and `owner.mutex` held: every call into the runtime that can take a while
// or race with another thread's call goes through here (other Python threads run meanwhile).
template <class Owner, class Fn>
auto without_gil_locked(Owner& owner, Fn&& fn) {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(owner.mutex);
  return fn();
}

dpkit::ConstFloatSpan span_of(const FloatArray& a) { return {a.data(), static_cast<std::size_t>(a.size())}; }

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A numeric numpy array as float32, C order (one conversion when it is not already). Anything else --
// a list, strings, booleans, objects -- is an InputError naming `what`, never a silent cast.
FloatArray as_float32(const py::handle& obj, const std::string& what) {
  if (!py::isinstance<py::array>(obj))
    throw dpkit::InputError(what + " must be a numpy array, got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  const py::array a = py::reinterpret_borrow<py::array>(obj);
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u')
    throw dpkit::InputError(what + " must hold numbers, got dtype " + std::string(py::str(a.dtype())));
  return FloatArray::ensure(a);
}

// Injected noise must have exactly the documented shape (C++ alone sees only a float count).
void check_shape(const FloatArray& a, const std::string& what, const std::vector<py::ssize_t>& want) {
  bool ok = static_cast<std::size_t>(a.ndim()) == want.size();
  for (std::size_t d = 0; ok && d < want.size(); ++d) ok = a.shape(static_cast<py::ssize_t>(d)) == want[d];
  if (ok) return;
  std::string w = "(";
  for (std::size_t d = 0; d < want.size(); ++d) w += (d ? ", " : "") + std::to_string(want[d]);
  throw dpkit::InputError(what + " has shape " + shape_of(a) + ", expected " + w + (want.size() == 1 ? ",)" : ")"));
}

// A Python integer (int or numpy integer) as long long; one too large for it is an InputError naming `name`,
// never pybind11's "Unable to cast". The caller then range-checks the value.
long long as_long_long(const py::object& v, const std::string& name) {
  const py::int_ i(v);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow != 0) throw dpkit::InputError(name + " is out of range, got " + std::string(py::repr(v)));
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return x;
}

// Every integer argument arrives as a Python object and is range-checked here, before any C++ cast: a
// value outside int's range is one InputError naming the argument, not pybind's "incompatible arguments".
int int_arg(const py::object& v, const std::string& name, int none_value) {
  if (v.is_none()) return none_value;
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw dpkit::InputError(name + " must be an integer, got " + std::string(py::repr(v)));
  const long long x = as_long_long(v, name);
  if (x < -(1LL << 30) || x > (1LL << 30)) throw dpkit::InputError(name + " is out of range, got " + std::to_string(x));
  return static_cast<int>(x);
}

// A generator seed: an integer in [0, 2**64 - 1] (the C++ type; request_seed's results fill all of it),
// checked before any cast.
std::uint64_t seed_arg(const py::object& v, const std::string& name) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw dpkit::InputError(name + " must be an integer, got " + std::string(py::repr(v)));
  const py::object i = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!i) throw py::error_already_set();
  const unsigned long long x = PyLong_AsUnsignedLongLong(i.ptr());
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw dpkit::InputError(name + " must be an integer in [0, 2**64 - 1], got " + std::string(py::repr(v)));
  }
  return static_cast<std::uint64_t>(x);
}

std::vector<int> int_list_arg(const py::object& v, const std::string& name) {
  if (!py::isinstance<py::sequence>(v) || py::isinstance<py::str>(v))
    throw dpkit::InputError(name + " must be a list of integers, got " + std::string(py::repr(v)));
  std::vector<int> out;
  for (const py::handle& x : py::reinterpret_borrow<py::sequence>(v))
    out.push_back(int_arg(py::reinterpret_borrow<py::object>(x), name + " entry", 0));
  return out;
}

// find_sampler's arguments as Python passes them: None = "not given" (the C++ rule then applies).
dpkit::Sampler find_sampler(const PyPolicy& self, const py::object& sampler, const py::object& steps) {
  std::string kind;
  if (!sampler.is_none()) {
    if (!py::isinstance<py::str>(sampler))
      throw dpkit::InputError("sampler must be 'ddpm', 'ddim', 'fewstep' or None, got " + std::string(py::repr(sampler)));
    kind = sampler.cast<std::string>();
    if (kind.empty()) throw dpkit::InputError("unknown sampler '' (expected ddpm, ddim or fewstep)");
  }
  int k = 0;
  if (!steps.is_none()) {
    // An integer (Python or numpy), not a bool and not a float: 10.6 must not quietly become 10.
    if (PyBool_Check(steps.ptr()) || !PyIndex_Check(steps.ptr()))
      throw dpkit::InputError("num_inference_steps must be an integer, got " + std::string(py::repr(steps)));
    const long long v = as_long_long(steps, "num_inference_steps");
    if (v < 1 || v > 1000000)
      throw dpkit::InputError("num_inference_steps must be in [1, 1000000], got " + std::to_string(v));
    k = static_cast<int>(v);
  }
  return self.policy.find_sampler(kind, k);
}

// The batch comes from the first observation's leading dimension; C++ then checks every size.
py::tuple sample(PyPolicy& self_, const py::object& observations_in, const py::object& sampler_in,
                 const py::object& initial_noise_in, const py::object& step_noise_in, const py::object& prefix_in,
                 const py::object& prefix_start_in, const py::object& prefix_weights_in) {
  const int prefix_start = int_arg(prefix_start_in, "prefix_start", -1);
  dpkit::Policy& self = self_.policy;
  const dpkit::PolicyInfo& info = self.info();
  if (!py::isinstance<dpkit::Sampler>(sampler_in))
    throw dpkit::InputError("sampler must be a Sampler from Policy.find_sampler, got " +
                            std::string(py::str(py::type::of(sampler_in).attr("__name__"))));
  const dpkit::Sampler sampler = sampler_in.cast<dpkit::Sampler>();
  if (!py::isinstance<py::list>(observations_in) && !py::isinstance<py::tuple>(observations_in))
    throw dpkit::InputError("observations must be a list of numpy arrays, one per encoder input");
  std::vector<FloatArray> observations;
  for (const py::handle& o : py::reinterpret_borrow<py::sequence>(observations_in)) {
    const std::size_t i = observations.size();
    observations.push_back(as_float32(o, "observation '" + (i < info.observations.size() ? info.observations[i].name
                                                                                        : std::to_string(i)) + "'"));
  }
  if (observations.empty() || observations[0].ndim() < 2)
    throw dpkit::InputError("observations: expected " + std::to_string(info.observations.size()) +
                            " arrays shaped (B, To, ...), the first one (B, " + std::to_string(info.n_obs_steps) + ", ...)");
  // Full shape checks here, where the numpy shape is known, so messages show what the caller passed.
  const py::ssize_t B0 = observations[0].shape(0);
  for (std::size_t i = 0; i < observations.size() && i < info.observations.size(); ++i) {
    const auto& o = info.observations[i];
    std::vector<py::ssize_t> want = {B0, info.n_obs_steps};
    want.insert(want.end(), o.shape.begin(), o.shape.end());
    const auto& a = observations[i];
    bool ok = static_cast<std::size_t>(a.ndim()) == want.size();
    for (std::size_t d = 0; ok && d < want.size(); ++d) ok = a.shape(static_cast<py::ssize_t>(d)) == want[d];
    if (!ok) {
      std::string w = "(B";
      for (std::size_t d = 1; d < want.size(); ++d) w += ", " + std::to_string(want[d]);
      throw dpkit::InputError("observation '" + o.name + "' has shape " + shape_of(a) + ", expected " + w +
                              ") with the same B for every input");
    }
  }
  if (B0 < 1 || B0 > info.max_batch)
    throw dpkit::InputError("batch " + std::to_string(B0) + " is outside [1, max_batch = " + std::to_string(info.max_batch) + "]");
  const int B = static_cast<int>(B0);
  std::optional<FloatArray> initial_noise, step_noise;
  if (!initial_noise_in.is_none()) {
    initial_noise = as_float32(initial_noise_in, "initial_noise");
    check_shape(*initial_noise, "initial_noise", {B, info.horizon, info.action_dim});
  }
  if (!step_noise_in.is_none()) {
    step_noise = as_float32(step_noise_in, "step_noise");
    check_shape(*step_noise, "step_noise", {sampler.num_inference_steps(), B, info.horizon, info.action_dim});
  }
  std::optional<FloatArray> prefix, prefix_weights;
  if (!prefix_in.is_none()) {
    prefix = as_float32(prefix_in, "prefix");
    if (prefix->ndim() != 3 || prefix->shape(0) != B || prefix->shape(2) != info.action_dim || prefix->shape(1) < 1)
      throw dpkit::InputError("prefix has shape " + shape_of(*prefix) + ", expected (" + std::to_string(B) + ", P, " +
                              std::to_string(info.action_dim) + ") with P >= 1");
  }
  if (!prefix_weights_in.is_none()) {
    prefix_weights = as_float32(prefix_weights_in, "prefix_weights");
    if (prefix_weights->ndim() != 1)
      throw dpkit::InputError("prefix weights must be a 1-d array, got shape " + shape_of(*prefix_weights));
  }
  dpkit::SampleRequest req;
  req.batch = B;
  req.sampler = sampler;
  if (prefix) {
    req.prefix = span_of(*prefix);
    req.prefix_rows = static_cast<int>(prefix->shape(1));
    req.prefix_start = prefix_start;
  }
  if (prefix_weights) req.prefix_weights = span_of(*prefix_weights);
  for (const auto& a : observations) req.observations.push_back(span_of(a));
  if (initial_noise) req.initial_noise = span_of(*initial_noise);
  if (step_noise) req.step_noise = span_of(*step_noise);

  FloatArray traj({B, info.horizon, info.action_dim});
  FloatArray actions({B, info.n_action_steps, info.action_dim});
  dpkit::SampleOutput out{{traj.mutable_data(), static_cast<std::size_t>(traj.size())},
                          {actions.mutable_data(), static_cast<std::size_t>(actions.size())}};
  without_gil_locked(self_, [&] { self.sample(req, out); });
  return py::make_tuple(traj, actions);
}

// dpkit::RealTimeController over a PyPolicy: its worker holds the policy's lock around each chunk, so the
// Policy stays usable (serialized) from Python. `mutex` serializes the controller's own calls.
struct PyController {
  PyController(PyPolicy& p, const dpkit::ControllerParams& params)
      : policy_of(&p), ctl(p.policy, params), batch(params.batch) {}
  PyPolicy* policy_of;
  dpkit::RealTimeController ctl;
  int batch;
  std::mutex mutex;
  std::vector<dpkit::ConstFloatSpan> spans;  // this step's observations, read by C++ during the call
};

dpkit::Execution execution_of(const std::string& e) {
  if (e == "sync") return dpkit::Execution::sync;
  if (e == "async") return dpkit::Execution::async;
  if (e == "async-inpaint") return dpkit::Execution::async_inpaint;
  throw dpkit::InputError("execution must be one of sync, async, async-inpaint, got '" + e + "'");
}


// One tick's observations: {name: (B, *shape)} or a list in info order, B = the controller's batch.
py::array_t<float> controller_step(PyController& self, PyPolicy& policy, const py::object& obs_in) {
  const dpkit::PolicyInfo& info = policy.policy.info();
  std::vector<FloatArray> held;
  if (py::isinstance<py::dict>(obs_in)) {
    const py::dict d = py::reinterpret_borrow<py::dict>(obs_in);
    bool match = d.size() == info.observations.size();
    for (const auto& o : info.observations) match = match && d.contains(o.name);
    if (!match) {
      std::string got, want;
      for (const auto& kv : d) got += (got.empty() ? "" : ", ") + std::string(py::str(kv.first));
      for (const auto& o : info.observations) want += (want.empty() ? "" : ", ") + o.name;
      throw dpkit::InputError("observation keys [" + got + "] do not match the policy's [" + want + "]");
    }
    for (const auto& o : info.observations) held.push_back(as_float32(d[py::str(o.name)], "observation '" + o.name + "'"));
  } else if (py::isinstance<py::list>(obs_in) || py::isinstance<py::tuple>(obs_in)) {
    for (const py::handle& o : py::reinterpret_borrow<py::sequence>(obs_in))
      held.push_back(as_float32(o, "observation " + std::to_string(held.size())));
    if (held.size() != info.observations.size())
      throw dpkit::InputError("expected " + std::to_string(info.observations.size()) + " observation arrays, got " +
                              std::to_string(held.size()));
  } else {
    throw dpkit::InputError("observations must be a dict {name: array} or a list of arrays, got " +
                            std::string(py::str(py::type::of(obs_in).attr("__name__"))));
  }
  for (std::size_t i = 0; i < held.size(); ++i) {
    std::vector<py::ssize_t> want = {self.batch};
    want.insert(want.end(), info.observations[i].shape.begin(), info.observations[i].shape.end());
    check_shape(held[i], "observation '" + info.observations[i].name + "'", want);
  }
  py::array_t<float> action({self.batch, info.action_dim});
  without_gil_locked(self, [&] {
    self.spans.clear();
    for (const auto& a : held) self.spans.push_back(span_of(a));
    self.ctl.step(self.spans, {action.mutable_data(), static_cast<std::size_t>(action.size())});
  });
  return action;
}

// A graph's (name, element type, dims) with None for a dynamic dim, as onnxruntime reports shapes.
py::list io_list(const std::vector<dpkit::detail::OnnxInfo::Io>& ios) {
  py::list out;
  for (const auto& [name, elem, dims] : ios) {
    py::list d;
    for (int64_t v : dims) d.append(v < 0 ? py::object(py::none()) : py::object(py::int_(v)));
    out.append(py::make_tuple(name, elem, py::tuple(d)));
  }
  return out;
}

py::dict onnx_info_dict(const std::string& path) {
  dpkit::detail::OnnxInfo info;
  {
    py::gil_scoped_release release;
    info = dpkit::detail::read_onnx_info(path);
  }
  const auto [precision, evidence] = dpkit::detail::graph_precision(info);
  py::dict d;
  d["inputs"] = io_list(info.inputs);
  d["outputs"] = io_list(info.outputs);
  py::set external;
  for (const auto& e : info.external) external.add(e);
  d["external"] = external;
  d["op_types"] = info.op_types;
  d["tensor_types"] = info.tensor_types;
  d["precision"] = precision;
  d["evidence"] = evidence;
  return d;
}

py::dict controller_stats(PyController& self) {
  const dpkit::ControllerStats s = without_gil_locked(self, [&] { return self.ctl.stats(); });
  py::dict d;
  d["ticks"] = s.ticks;
  d["requests"] = s.requests;
  d["chunks"] = s.chunks;
  d["deadline_misses"] = s.deadline_misses;
  d["wait_ticks"] = s.wait_ticks;
  d["latencies_s"] = s.latencies_s;
  if (s.latencies_s.empty()) {
    d["latency_ms"] = py::none();
  } else {
    py::dict ms;
    for (auto [name, q] : {std::pair{"p50", 50.0}, {"p90", 90.0}, {"p99", 99.0}, {"max", 100.0}})
      ms[name] = 1e3 * s.latency_percentile(q);
    d["latency_ms"] = ms;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dpkit C++ runtime (see dpkit.runtime.cpp_policy.CppPolicy)";

  // The C++ errors are dpkit.errors' own classes, each a DpkitError (so CLIs print one line) and the builtin a
  // caller expects: dpkit::InputError -> InputError (a ValueError), any other dpkit::Error -> RuntimeFailure
  // (a RuntimeError). `except dpkit.errors.InputError` thus catches every backend's; _core.InputError and
  // _core.Error name the same classes. The references are kept for the process (the translator uses them).
  py::module_ errors = py::module_::import("dpkit.errors");
  static py::handle input_error, runtime_error;
  input_error = py::object(errors.attr("InputError")).release();
  runtime_error = py::object(errors.attr("RuntimeFailure")).release();
  m.attr("InputError") = input_error;
  m.attr("Error") = runtime_error;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const dpkit::InputError& e) {
      PyErr_SetString(input_error.ptr(), e.what());
    } catch (const dpkit::Error& e) {
      PyErr_SetString(runtime_error.ptr(), e.what());
    }
  });

  // The bundle reader alone: no ONNX Runtime, no session (dpkit.runtime.bundle builds its view from these).
  m.def("read_bundle", [](const std::string& bundle_dir, bool verify_sha256, bool check_files) {
          // The files' digests come from dpkit.io.sha256_file (hashlib: several times faster than the runtime's
          // self-written sha256); which files, the comparison and the message stay the reader's.
          const py::object sha256_file = py::module_::import("dpkit.io").attr("sha256_file");
          const dpkit::detail::Digest digest = [&sha256_file](const std::string& path) {
            py::gil_scoped_acquire gil;
            try {
              return sha256_file(path).cast<std::string>();
            } catch (const py::error_already_set& e) {
              throw dpkit::Error("cannot read " + path + ": " + e.what());
            }
          };
          std::string text;
          {
            py::gil_scoped_release release;
            text = dpkit::detail::read_bundle(bundle_dir, check_files, verify_sha256, digest).json;
          }
          return text;
        }, py::arg("bundle_dir"), py::arg("verify_sha256") = true, py::arg("check_files") = true,
        "Apply every rule of the bundle format to the folder: policy.json (read once), then (check_files) the "
        "files it names, the graphs' inputs/outputs and precision, and (verify_sha256) every sha256. Returns "
        "the checked policy.json as compact JSON text (the file's key order); a refusal is one-line Error.");
  m.def("read_onnx_info", &onnx_info_dict, py::arg("path"),
        "What the reader knows of an .onnx file from its protobuf: inputs (initializers excluded) and outputs "
        "as (name, element type, dims with None = dynamic), external-data locations, op and tensor type "
        "counts, and the precision it derives with its evidence.");
  m.def("bundle_limits", [] {
          py::dict d;
          for (const auto& [name, value] : dpkit::detail::bundle_limits()) d[py::str(name)] = value;
          return d;
        }, "The reader's size limits by name (docs/bundle-format.md, \"Limits\"), e.g. max_trt_batch.");

  // Made only by Policy.find_sampler; sample() refuses one from another Policy.
  py::class_<dpkit::Sampler>(m, "Sampler")
      .def_property_readonly("name", &dpkit::Sampler::name)
      .def_property_readonly("sampler", &dpkit::Sampler::sampler)
      .def_property_readonly("num_inference_steps", &dpkit::Sampler::num_inference_steps)
      .def_property_readonly("uses_step_noise", &dpkit::Sampler::uses_step_noise)
      .def("__repr__", [](const dpkit::Sampler& s) { return "<dpkit Sampler " + s.name() + ">"; });

  py::class_<PyPolicy>(m, "Policy")
      .def(py::init([](const std::string& bundle_dir, const std::string& provider, const py::object& threads,
                       const py::object& max_batch, const py::object& seed, const std::string& ort_library,
                       bool verify_sha256, const py::object& device_id, bool allow_spinning) {
             dpkit::PolicyParams p;
             p.provider = provider;
             p.intra_op_threads = int_arg(threads, "threads", 1);
             p.max_batch = int_arg(max_batch, "max_batch", 8);
             p.seed = seed_arg(seed, "seed");
             p.ort_library = ort_library;
             p.verify_sha256 = verify_sha256;
             p.device_id = int_arg(device_id, "device_id", 0);
             p.allow_spinning = allow_spinning;
             py::gil_scoped_release release;  // loading sessions can take a while
             return std::make_unique<PyPolicy>(bundle_dir, p);
           }),
           py::arg("bundle_dir"), py::arg("provider") = "cpu", py::arg("threads") = 1, py::arg("max_batch") = 8,
           py::arg("seed") = 0, py::arg("ort_library") = "", py::arg("verify_sha256") = true, py::arg("device_id") = 0,
           py::arg("allow_spinning") = false)  // PolicyParams' defaults
      .def("find_sampler", &find_sampler, py::arg("sampler") = py::none(), py::arg("num_inference_steps") = py::none(),
           "the bundle's sampler of this kind ('ddpm'/'ddim'/'fewstep'; None: the default sampler's kind) with this many steps "
           "(None: the default sampler if of that kind, else the kind's largest); InputError lists the available ones")
      .def("reseed", [](PyPolicy& self, const py::object& seed_in) {
             const std::uint64_t seed = seed_arg(seed_in, "seed");
             without_gil_locked(self, [&] { self.policy.reseed(seed); });
           }, py::arg("seed"))
      .def("sample", &sample, py::arg("observations"), py::arg("sampler"), py::arg("initial_noise") = py::none(),
           py::arg("step_noise") = py::none(), py::arg("prefix") = py::none(), py::arg("prefix_start") = -1,
           py::arg("prefix_weights") = py::none(),
           "observations: list of float32 arrays in info order; sampler: from find_sampler -> "
           "(trajectory (B,H,A), actions (B,Ta,A)). prefix (B,P,A) normalized: a committed prefix the "
           "trajectory continues (inpainting) at rows prefix_start (-1: first_action_index) on, with optional "
           "per-row prefix_weights (P,) in [0, 1]")
      .def_property_readonly("last_timing", [](PyPolicy& self) {
        const dpkit::SampleTiming t = without_gil_locked(self, [&] { return self.policy.last_timing(); });
        py::dict d;
        d["total_ms"] = t.total_ms;
        d["encoder_ms"] = t.encoder_ms;
        d["denoiser_ms"] = t.denoiser_ms;
        d["loop_ms"] = t.loop_ms();
        d["steps"] = t.steps;
        return d;
      }, "where the last sample() call's time went (ms): total, encoder, denoiser (all K runs), loop (the rest)")
      .def_property_readonly("info", [](const PyPolicy& self) {
        const dpkit::PolicyInfo& i = self.policy.info();
        py::list obs, samplers;
        for (const auto& o : i.observations) obs.append(py::make_tuple(o.name, py::tuple(py::cast(o.shape))));
        for (const auto& s : i.samplers) samplers.append(py::make_tuple(s.name, s.sampler, s.num_inference_steps));
        py::dict d;
        d["bundle_dir"] = i.bundle_dir;
        d["obs_mode"] = i.obs_mode;
        d["n_obs_steps"] = i.n_obs_steps;
        d["horizon"] = i.horizon;
        d["n_action_steps"] = i.n_action_steps;
        d["action_dim"] = i.action_dim;
        d["first_action_index"] = i.first_action_index;
        d["cond_dim"] = i.cond_dim;
        d["max_batch"] = i.max_batch;
        d["observations"] = obs;
        d["action_scale"] = i.action_scale;
        d["action_offset"] = i.action_offset;
        d["samplers"] = samplers;
        d["default_sampler"] = i.default_sampler;  // its name
        d["precision"] = i.precision;
        d["provider"] = i.provider;
        d["ort_version"] = i.ort_version;
        d["ort_library"] = i.ort_library;
        return d;
      });

  // The Policy must outlive the controller (keep_alive); `step` releases the GIL (it may wait for a chunk).
  py::class_<PyController>(m, "RealTimeController")
      .def(py::init([](PyPolicy& policy, const std::string& execution, const py::object& delay, const py::object& margin,
                       const py::object& blend, const py::object& sampler, const py::object& steps,
                       const py::object& seed, double period, const py::object& batch, const py::object& worker_cpus,
                       const py::object& worker_priority) {
             dpkit::ControllerParams p;
             p.execution = execution_of(execution);
             p.delay = int_arg(delay, "delay", -1);
             p.margin = int_arg(margin, "margin", 0);
             p.blend = int_arg(blend, "blend", 0);
             p.sampler = find_sampler(policy, sampler, steps);
             p.seed = seed_arg(seed, "seed");
             p.period = period;
             p.batch = int_arg(batch, "batch", 1);
             p.worker_cpus = int_list_arg(worker_cpus, "worker_cpus");
             p.worker_priority = int_arg(worker_priority, "worker_priority", 0);
             p.policy_mutex = &policy.mutex;
             return std::make_unique<PyController>(policy, p);
           }),
           py::arg("policy"), py::arg("execution") = "async-inpaint", py::arg("delay") = py::none(),
           py::arg("margin") = 0, py::arg("blend") = 0, py::arg("sampler") = py::none(),
           py::arg("num_inference_steps") = py::none(), py::arg("seed") = 0, py::arg("period") = 0.1,
           py::arg("batch") = 1, py::arg("worker_cpus") = py::list(), py::arg("worker_priority") = 0,
           py::keep_alive<1, 2>(),
           "dpkit::RealTimeController: delay None/-1 = measured on the wall clock, else fixed (virtual time)")
      .def("step", [](PyController& self, const py::object& obs) {
             return controller_step(self, *self.policy_of, obs);
           }, py::arg("observations"), "one tick: {name: (B, *shape)} or a list -> this tick's action (B, A)")
      .def_property_readonly("stats", &controller_stats)
      .def_property_readonly("switched", [](PyController& self) {
        return without_gil_locked(self, [&] { return self.ctl.switched(); });
      })
      .def_property_readonly("batch", [](const PyController& self) { return self.batch; })
      .def_property_readonly("worker_setup", [](const PyController& self) { return self.ctl.worker_setup(); },
                             "what worker_cpus / worker_priority did (applied, or refused and why); '' if unused")
      .def("expected_delay", [](PyController& self) {
        return without_gil_locked(self, [&] { return self.ctl.expected_delay(); });
      })
      .def("close", [](PyController& self) { without_gil_locked(self, [&] { self.ctl.close(); }); })
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyController& self, const py::args&) {
        without_gil_locked(self, [&] { self.ctl.close(); });
      })
      .def_static("request_seed", [](const py::object& seed, const py::object& request) {
             return dpkit::RealTimeController::request_seed(seed_arg(seed, "seed"), seed_arg(request, "request"));
           }, py::arg("seed"), py::arg("request"),
                  "the generator seed of request `request` (the Policy is reseeded with it before that chunk)");
}
