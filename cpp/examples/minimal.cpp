// The smallest dpkit program: load a bundle, sample once from all-zero observations, print the actions.
//   dpkit_minimal BUNDLE   (libonnxruntime.so from $DPKIT_ORT_LIBRARY or the system's loader path)
#include <cstdio>
#include <vector>

#include "dpkit/runtime.hpp"

int main(int argc, char** argv) try {
  if (argc != 2) return std::fprintf(stderr, "usage: dpkit_minimal BUNDLE\n"), 2;
  dpkit::Policy policy(argv[1]);
  const dpkit::PolicyInfo& info = policy.info();

  dpkit::SampleRequest request;                    // batch 1
  request.sampler = policy.default_sampler();
  std::vector<std::vector<float>> obs;             // one (1, To, ...) array per encoder input
  for (std::size_t i = 0; i < info.observations.size(); ++i) {
    obs.emplace_back(info.observation_size(i), 0.0f);
    request.observations.push_back({obs[i].data(), obs[i].size()});
  }
  std::vector<float> actions(info.actions_size());  // (1, Ta, A)
  dpkit::SampleOutput out;
  out.actions = {actions.data(), actions.size()};
  policy.sample(request, out);

  std::printf("%s: %d actions of %d from %s\n", info.bundle_dir.c_str(), info.n_action_steps, info.action_dim,
              request.sampler.name().c_str());
  for (int t = 0; t < info.n_action_steps; ++t) {
    for (int a = 0; a < info.action_dim; ++a) std::printf(" %9.3f", actions[static_cast<std::size_t>(t * info.action_dim + a)]);
    std::printf("\n");
  }
  return 0;
} catch (const dpkit::Error& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
