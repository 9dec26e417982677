"""dpkit.eval: score a policy in gym-pusht with the original Diffusion Policy protocol (`dpkit-eval`).

    from dpkit.eval.evaluate import evaluate_policy
    from dpkit.runtime import load_policy
    report = evaluate_policy(load_policy("bundles/tiny", backend="cpp"), episodes=50)

A consumer of the runtime, not part of it: a deployment installs `dpkit.runtime` and never imports this.
Modules: `pusht` (the environment adapter: legacy start states, observations, keypoints, rendering) and
`evaluate` (the protocol, the report and the CLI).
"""
