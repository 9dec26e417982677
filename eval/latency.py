"""PushT under inference latency: the simulator advances `d` steps while a chunk is computed.

    dpkit-eval --bundle bundles/tiny --backend cpp --latency-steps 2 --execution async-inpaint
    from dpkit.eval.latency import evaluate_latency
    report = evaluate_latency(policy, latency_steps=2, execution="async")

The policy runs inside the real-time controller (dpkit.runtime.realtime.RealTimeController) on a virtual
clock: the chunk requested at step n is delivered at step n + d exactly, so a run is reproducible and the
three execution modes see the same seeds, the same start states and the same noise per request:
  sync           the robot holds its last target while it waits (a synchronous controller on a robot)
  async          the rest of the old chunk executes; the new one is switched in at index d
  async-inpaint  as async, the new chunk sampled to continue the d actions executed meanwhile
d = 0 is the original protocol's timing (the simulator waits for every chunk) in all three modes.

Episodes run in waves of `n_envs` environments stepped in lockstep (one batched controller per wave); an
environment whose episode ended keeps its last observation and its actions are not executed. Besides the
score, the report has the deadline misses (async ticks with nothing to execute), the hold ticks (sync) and
the mean action jump |a_t - a_{t-1}| at chunk switches against inside chunks — the discontinuity that
inpainting is meant to remove.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from dpkit.errors import DpkitError
from dpkit.eval import pusht
from dpkit.eval.protocol import check_blend, check_policy, env_count, protocol_fields
from dpkit.runtime.realtime import EXECUTIONS, make_controller


def evaluate_latency(
    policy: Any,
    latency_steps: int = 0,
    execution: str = "async-inpaint",
    blend: int = 0,
    episodes: int = pusht.N_TEST_EPISODES,
    seed_start: int = pusht.LEGACY_TEST_SEED,
    max_steps: int = pusht.MAX_STEPS,
    n_envs: int | None = None,
    progress: bool = True,
    sampler: str | None = None,
    steps: int | None = None,
    sample_seed: int = 0,
) -> dict[str, Any]:
    """Roll `policy` out under a fixed inference delay of `latency_steps` steps; returns the report."""
    if execution not in EXECUTIONS:
        raise DpkitError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    if episodes < 1 or max_steps < 1:
        raise DpkitError(f"episodes and max_steps must be >= 1, got {episodes}, {max_steps}")
    check_blend(blend, execution, latency_steps)
    check_policy(policy)  # a policy for another task is refused by name, as in evaluate_policy
    n_envs = env_count(policy, episodes, n_envs)
    from tqdm import tqdm

    mode = policy.obs_mode
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    jumps = {"switch": [], "inside": []}
    totals = {"deadline_misses": 0, "wait_ticks": 0, "chunks": 0}
    latencies: list[float] = []
    bar = tqdm(total=episodes, unit="episode", desc=f"eval {execution} d={latency_steps}", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    envs = [pusht.make_env(mode) for _ in range(n_envs)]
    try:
        for wave_start in range(0, episodes, n_envs):
            wave = list(range(wave_start, min(wave_start + n_envs, episodes)))
            seeds = [seed_start + i for i in wave]
            obs = [pusht.observe(envs[j], mode, pusht.reset_legacy(envs[j], s), policy.obs_keys)
                   for j, s in enumerate(seeds)]
            ctl = make_controller(policy, execution=execution, delay=latency_steps, blend=blend, sampler=sampler,
                                  steps=steps, seed=int(np.random.SeedSequence([sample_seed, wave_start])
                                                        .generate_state(1)[0]))
            with ctl:
                done = [False] * len(wave)
                best = [0.0] * len(wave)
                used = [0] * len(wave)
                success = [False] * len(wave)
                previous = None
                for _ in range(max_steps):
                    batch = {k: np.stack([o[k] for o in obs]) for k in policy.obs_keys}
                    actions = ctl.step(batch)
                    if not np.all(np.isfinite(actions)):
                        raise DpkitError("policy returned non-finite actions")
                    if previous is not None:
                        jump = np.linalg.norm(actions - previous, axis=-1)
                        live = [j for j in range(len(wave)) if not done[j]]
                        jumps["switch" if ctl.switched else "inside"].extend(jump[live].tolist())
                    previous = actions
                    for j in range(len(wave)):
                        if done[j]:
                            continue
                        raw, reward, terminated, _, info = envs[j].step(actions[j].astype(np.float64))
                        used[j] += 1
                        best[j] = max(best[j], float(reward))
                        obs[j] = pusht.observe(envs[j], mode, raw, policy.obs_keys)
                        if terminated:
                            success[j], done[j] = bool(info["is_success"]), True
                    if all(done):
                        break
                stats = ctl.stats
            for k in totals:
                totals[k] += getattr(stats, k)
            latencies.extend(stats.latencies_s)
            results.extend({"seed": s, "max_reward": best[j], "steps": used[j], "success": success[j]}
                           for j, s in enumerate(seeds))
            bar.update(len(wave))
            bar.set_postfix(score=f"{np.mean([r['max_reward'] for r in results]):.3f}")
    finally:
        bar.close()
        for env in envs:
            env.close()

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return {
        "score": float(np.mean([r["max_reward"] for r in results])),
        "success_rate": float(np.mean([r["success"] for r in results])),
        "backend": str(getattr(policy, "backend", type(policy).__name__)),
        "obs_mode": mode,
        "execution": execution,
        "latency_steps": int(latency_steps),
        "blend": int(blend),
        "n_obs_steps": int(policy.n_obs_steps),
        "n_action_steps": int(policy.n_action_steps),
        "sampler": ctl.choice.name,
        "n_chunks": totals["chunks"],
        "deadline_misses": totals["deadline_misses"],
        "wait_ticks": totals["wait_ticks"],
        "mean_jump_at_switch_px": mean(jumps["switch"]),
        "mean_jump_inside_px": mean(jumps["inside"]),
        "mean_chunk_latency_ms": float(np.mean(latencies) * 1e3) if latencies else None,
        **protocol_fields(episodes, seed_start, max_steps, n_envs, sample_seed, t_start),
        "episodes": results,
    }
