// Samples one action chunk with zero observations: proves headers, library and link line are usable.
//   consumer BUNDLE [ORT_LIBRARY]
#include <dpkit/runtime.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  try {
    dpkit::PolicyParams params;
    if (argc > 2) params.ort_library = argv[2];
    dpkit::Policy policy(argv[1], params);
    const dpkit::PolicyInfo& info = policy.info();
    std::vector<std::vector<float>> obs;
    dpkit::SampleRequest req;
    for (std::size_t i = 0; i < info.observations.size(); ++i) {
      obs.emplace_back(info.observation_size(i), 0.0f);
      req.observations.push_back({obs.back().data(), obs.back().size()});
    }
    req.sampler = policy.default_sampler();
    std::vector<float> actions(info.actions_size());
    dpkit::SampleOutput out;
    out.actions = {actions.data(), actions.size()};
    policy.sample(req, out);
    std::printf("ok: ONNX Runtime %s, first action (%.3f, %.3f)\n", info.ort_version.c_str(), actions[0], actions[1]);
  } catch (const dpkit::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
