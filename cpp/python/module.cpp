// dpkit.runtime._core: dpkit::Policy for Python. Used through dpkit.runtime.cpp_policy.CppPolicy.
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

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace {

// dpkit::Policy plus the lock that makes one Python object safe to share between threads.
struct PyPolicy {
  PyPolicy(const std::string& dir, const dpkit::PolicyParams& p) : policy(dir, p) {}
  dpkit::Policy policy;
  std::mutex mutex;
};

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

// find_sampler's arguments as Python passes them: None = "not given" (the C++ rule then applies).
dpkit::Sampler find_sampler(const PyPolicy& self, const py::object& sampler, const py::object& steps) {
  std::string kind;
  if (!sampler.is_none()) {
    if (!py::isinstance<py::str>(sampler))
      throw dpkit::InputError("sampler must be 'ddpm', 'ddim' or None, got " + std::string(py::repr(sampler)));
    kind = sampler.cast<std::string>();
    if (kind.empty()) throw dpkit::InputError("unknown sampler '' (expected ddpm or ddim)");
  }
  int k = 0;
  if (!steps.is_none()) {
    // An integer (Python or numpy), not a bool and not a float: 10.6 must not quietly become 10.
    if (PyBool_Check(steps.ptr()) || !PyIndex_Check(steps.ptr()))
      throw dpkit::InputError("num_inference_steps must be an integer, got " + std::string(py::repr(steps)));
    const long long v = py::int_(steps).cast<long long>();
    if (v < 1 || v > 1000000)
      throw dpkit::InputError("num_inference_steps must be >= 1, got " + std::to_string(v));
    k = static_cast<int>(v);
  }
  return self.policy.find_sampler(kind, k);
}

// The batch comes from the first observation's leading dimension; C++ then checks every size.
py::tuple sample(PyPolicy& self_, const py::object& observations_in, const py::object& sampler_in,
                 const py::object& initial_noise_in, const py::object& step_noise_in) {
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
  dpkit::SampleRequest req;
  req.batch = B;
  req.sampler = sampler;
  for (const auto& a : observations) req.observations.push_back(span_of(a));
  if (initial_noise) req.initial_noise = span_of(*initial_noise);
  if (step_noise) req.step_noise = span_of(*step_noise);

  FloatArray traj({B, info.horizon, info.action_dim});
  FloatArray actions({B, info.n_action_steps, info.action_dim});
  dpkit::SampleOutput out{{traj.mutable_data(), static_cast<std::size_t>(traj.size())},
                          {actions.mutable_data(), static_cast<std::size_t>(actions.size())}};
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(self_.mutex);
    self.sample(req, out);
  }
  return py::make_tuple(traj, actions);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dpkit C++ runtime (see dpkit.runtime.cpp_policy.CppPolicy)";

  // Python classes that are both DpkitError (so CLIs print one line) and the builtin a caller expects.
  py::object dpkit_error = py::module_::import("dpkit.errors").attr("DpkitError");
  static py::handle input_error, runtime_error;
  input_error = PyErr_NewException("dpkit.runtime._core.InputError",
                                   py::make_tuple(dpkit_error, py::handle(PyExc_ValueError)).ptr(), nullptr);
  runtime_error = PyErr_NewException("dpkit.runtime._core.Error",
                                     py::make_tuple(dpkit_error, py::handle(PyExc_RuntimeError)).ptr(), nullptr);
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

  // Made only by Policy.find_sampler; sample() refuses one from another Policy.
  py::class_<dpkit::Sampler>(m, "Sampler")
      .def_property_readonly("name", &dpkit::Sampler::name)
      .def_property_readonly("sampler", &dpkit::Sampler::sampler)
      .def_property_readonly("num_inference_steps", &dpkit::Sampler::num_inference_steps)
      .def_property_readonly("uses_step_noise", &dpkit::Sampler::uses_step_noise)
      .def("__repr__", [](const dpkit::Sampler& s) { return "<dpkit Sampler " + s.name() + ">"; });

  py::class_<PyPolicy>(m, "Policy")
      .def(py::init([](const std::string& bundle_dir, const std::string& provider, int threads, int max_batch,
                       std::uint64_t seed, const std::string& ort_library, bool verify_sha256, int device_id,
                       bool allow_spinning) {
             dpkit::PolicyParams p;
             p.provider = provider;
             p.intra_op_threads = threads;
             p.max_batch = max_batch;
             p.seed = seed;
             p.ort_library = ort_library;
             p.verify_sha256 = verify_sha256;
             p.device_id = device_id;
             p.allow_spinning = allow_spinning;
             py::gil_scoped_release release;  // loading sessions can take a while
             return std::make_unique<PyPolicy>(bundle_dir, p);
           }),
           py::arg("bundle_dir"), py::arg("provider") = "cpu", py::arg("threads") = 2, py::arg("max_batch") = 8,
           py::arg("seed") = 0, py::arg("ort_library") = "", py::arg("verify_sha256") = true, py::arg("device_id") = 0,
           py::arg("allow_spinning") = true)
      .def("find_sampler", &find_sampler, py::arg("sampler") = py::none(), py::arg("num_inference_steps") = py::none(),
           "the bundle's sampler of this kind ('ddpm'/'ddim'; None: the default sampler's kind) with this many steps "
           "(None: the default sampler if of that kind, else the kind's largest); InputError lists the available ones")
      .def("reseed", [](PyPolicy& self, std::uint64_t seed) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> lock(self.mutex);
             self.policy.reseed(seed);
           }, py::arg("seed"))
      .def("sample", &sample, py::arg("observations"), py::arg("sampler"), py::arg("initial_noise") = py::none(),
           py::arg("step_noise") = py::none(),
           "observations: list of float32 arrays in info order; sampler: from find_sampler -> "
           "(trajectory (B,H,A), actions (B,Ta,A))")
      .def_property_readonly("last_timing", [](PyPolicy& self) {
        dpkit::SampleTiming t;
        {
          py::gil_scoped_release release;
          std::lock_guard<std::mutex> lock(self.mutex);
          t = self.policy.last_timing();
        }
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
        d["provider"] = i.provider;
        d["ort_version"] = i.ort_version;
        d["ort_library"] = i.ort_library;
        return d;
      });
}
