"""dpkit.eval: score a policy in gym-pusht with the original Diffusion Policy protocol (`dpkit-eval`).

    from dpkit.eval.evaluate import evaluate_policy
    from dpkit.runtime import load_policy
    report = evaluate_policy(load_policy("bundles/tiny", backend="cpp"), episodes=50)

A consumer of the runtime, not part of it: a deployment installs `dpkit.runtime` and never imports this.
Modules: `pusht` (the environment adapter: legacy start states, observations, keypoints, rendering),
`protocol` (what every evaluation mode shares: the policy interface, its checks, the report's protocol keys),
`evaluate` (the original protocol, the report and the CLI) and `latency` (the protocol under inference
latency, a mode of `dpkit-eval`); both of the last two build on `protocol`, and only evaluate imports latency.
"""
