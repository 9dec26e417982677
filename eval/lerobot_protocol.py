"""Score a policy in gym-pusht the way lerobot-eval (lerobot 0.6.1) does: `dpkit-eval --protocol lerobot`.

    from dpkit.eval.lerobot_protocol import evaluate_lerobot
    report = evaluate_lerobot(load_policy("bundles/tiny", backend="ort"), episodes=50, n_envs=10)
    report["overall"]   # {"avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "eval_s", "eval_ep_s"}

The rules, as lerobot 0.6.1's own code has them (`lerobot/scripts/lerobot_eval.py`: `eval_policy`,
`rollout`, `eval_policy_all`; `lerobot/envs/configs.py`: `PushtEnv`, `EnvConfig.create_envs`;
`lerobot/configs/default.py`: `EvalConfig`; `lerobot/configs/eval.py`: `EvalPipelineConfig.seed`):

- Episodes run in batches of `batch_size` environments stepped in lock step (a gymnasium vector env,
  autoreset mode SAME_STEP). Batch b resets its environments with seeds `seed + b * batch_size + j`, so
  episode i has seed `seed + i` (default seed 1000, 50 episodes). When `batch_size` does not divide the
  episode count, the last batch still runs `batch_size` environments and the extra episodes are dropped.
- A start state is gym-pusht's own `reset(seed)` draw (the env's RNG), not the original paper's legacy
  states. The env is `gym_pusht/PushT-v0` with `max_episode_steps = episode_length = 300`; the
  observations are `pixels_agent_pos` (96 x 96 pixels) or `environment_state_agent_pos`.
- The policy is called with the whole batch every step; it plans a chunk when its action queue is empty
  (steps 0, Ta, 2 Ta, ...) from the last To observations (the first one repeated at reset).
- An environment is done when it terminates (success: coverage > 0.95) or is truncated (step limit); the
  rollout goes on until every environment of the batch is done or 300 steps have run. A finished
  environment is reset at once (no seed: its RNG continues) and keeps stepping a new episode, which
  lerobot ignores, but for one step: the per-episode mask keeps steps 0 .. done + 1, so the first step
  of the next episode counts in `sum_reward` (and `max_reward`, `success`) of an episode that ended
  before the last step of its batch. Results therefore depend on `batch_size` (with 1 environment no
  step follows the last). dpkit reproduces that, to report what lerobot-eval reports.
- Per episode: `sum_reward`, `max_reward` (of the masked rewards), `success` (any `is_success` in the
  mask); aggregated with nan-means: `avg_sum_reward`, `avg_max_reward`, `pc_success` (percent), plus
  `n_episodes`, `eval_s`, `eval_ep_s`.

What differs from lerobot-eval: the sampling noise (dpkit draws chunk c's noise from a seed derived from
(`sample_seed`, c); lerobot uses torch's global generator seeded with its `seed`), and its default
batch size (lerobot picks `min(floor(0.7 * CPU cores), n_episodes, 64)`, so it depends on the machine;
dpkit takes `n_envs`, default min(episodes, 50), and records it). `tests/lerobot_protocol_check.py` runs
a lerobot policy through lerobot's own `eval_policy` and its conversion through this module with the
same injected noise and compares them episode by episode.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any, Sequence

import numpy as np

from dpkit.errors import DpkitError
from dpkit.eval import pusht
from dpkit.eval.protocol import check_policy, env_count, policy_fields, protocol_fields

SEED = 1000
"""lerobot-eval's default `--seed` (EvalPipelineConfig.seed): the first episode's env seed."""
N_EPISODES = 50
"""lerobot-eval's default `--eval.n_episodes`."""
EPISODE_LENGTH = 300
"""lerobot's PushtEnv.episode_length (the TimeLimit and the rollout's step limit)."""
AGGREGATED = ("avg_sum_reward", "avg_max_reward", "pc_success", "n_episodes", "eval_s", "eval_ep_s")
"""lerobot-eval's `overall` metrics for PushT, under its names."""
PER_EPISODE = ("episode_ix", "sum_reward", "max_reward", "success", "seed")
"""lerobot's `eval_policy` per-episode keys (dpkit adds `start_state` and `done_step`)."""


def batch_seeds(episodes: int, batch_size: int, seed: int = SEED) -> list[list[int]]:
    """The env seeds of each batch, as lerobot's eval_policy draws them: ceil(episodes / batch_size) full
    batches, batch b seeded `seed + b * batch_size` .. `seed + (b + 1) * batch_size - 1`."""
    if episodes < 1 or batch_size < 1:
        raise DpkitError(f"episodes and batch_size must be >= 1, got {episodes} and {batch_size}")
    n_batches = episodes // batch_size + int(episodes % batch_size != 0)
    return [list(range(seed + b * batch_size, seed + (b + 1) * batch_size)) for b in range(n_batches)]


def episode_metrics(rewards: np.ndarray, successes: np.ndarray, done: np.ndarray) -> list[dict[str, Any]]:
    """Per-episode metrics of one batch from (T, B) arrays of step rewards, `is_success` flags and the
    cumulative done flags, with lerobot's mask: steps 0 .. first done + 1 (argmax's first True)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    successes = np.asarray(successes, dtype=bool)
    done = np.asarray(done, dtype=bool)
    if rewards.ndim != 2 or rewards.shape != successes.shape or rewards.shape != done.shape:
        raise DpkitError(f"expected three (T, B) arrays, got {rewards.shape}, {successes.shape}, {done.shape}")
    n_steps = rewards.shape[0]
    done_index = np.argmax(done, axis=0)  # 0 where never done, as lerobot's torch.argmax
    mask = np.arange(n_steps)[:, None] <= done_index[None, :] + 1
    masked = rewards * mask
    return [
        {"sum_reward": float(masked[:, j].sum()), "max_reward": float(masked[:, j].max()),
         "success": bool(np.any(successes[:, j] & mask[:, j])), "done_step": int(done_index[j])}
        for j in range(rewards.shape[1])
    ]


def aggregate(per_episode: Sequence[dict[str, Any]], eval_s: float) -> dict[str, Any]:
    """lerobot-eval's `overall` block from per-episode rows (nan-means; pc_success in percent)."""
    if not per_episode:
        raise DpkitError("no episodes to aggregate")
    n = len(per_episode)
    return {
        "avg_sum_reward": float(np.nanmean([e["sum_reward"] for e in per_episode])),
        "avg_max_reward": float(np.nanmean([e["max_reward"] for e in per_episode])),
        "pc_success": float(np.nanmean([float(e["success"]) for e in per_episode]) * 100),
        "n_episodes": n,
        "eval_s": float(eval_s),
        "eval_ep_s": float(eval_s) / n,
    }


def _reset(env: Any, mode: str, keys: Sequence[str], seed: int | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    raw, _ = env.reset(seed=seed) if seed is not None else env.reset()
    return pusht.observe(env, mode, raw, keys), pusht.env_state(env)


def evaluate_lerobot(
    policy: Any,
    episodes: int = N_EPISODES,
    seed_start: int = SEED,
    max_steps: int = EPISODE_LENGTH,
    n_envs: int | None = None,
    progress: bool = True,
    sampler: str | None = None,
    steps: int | None = None,
    sample_seed: int = 0,
) -> dict[str, Any]:
    """Roll `policy` out with lerobot-eval's rules (module docstring); returns dpkit's report with
    lerobot's `overall` metrics and `per_episode` rows. n_envs is lerobot's `eval.batch_size`; max_steps
    its env `episode_length`; seed_start its `seed`. Chunk c (counted over the whole run) is sampled with
    `seed` = a hash of (sample_seed, c)."""
    check_policy(policy)
    if episodes < 1:
        raise DpkitError(f"episodes must be >= 1, got {episodes}")
    if max_steps < 1:
        raise DpkitError(f"max_steps must be >= 1, got {max_steps}")
    batch = env_count(policy, episodes, n_envs)
    seeds = batch_seeds(episodes, batch, seed_start)
    if seed_start < 0 or seeds[-1][-1] > 2**32 - 1:
        raise DpkitError(f"seed_start must leave every env seed in [0, 2**32), got {seed_start}")

    from tqdm import tqdm

    t_start = time.perf_counter()
    mode, to, ta, keys = policy.obs_mode, int(policy.n_obs_steps), int(policy.n_action_steps), policy.obs_keys
    envs = [pusht.make_env(mode) for _ in range(batch)]
    rows: list[dict[str, Any]] = []
    latencies: list[float] = []
    bar = tqdm(total=len(seeds) * max_steps, unit="step", desc=f"lerobot-protocol eval {getattr(policy, 'backend', '')}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for batch_seeds_b in seeds:
            starts = []
            history: list[dict[str, collections.deque]] = []
            for env, seed in zip(envs, batch_seeds_b):
                first, state = _reset(env, mode, keys, seed)
                starts.append(state)
                history.append({k: collections.deque([v] * to, maxlen=to) for k, v in first.items()})
            rewards, successes, dones = [], [], []
            done = np.zeros(batch, dtype=bool)
            queue: collections.deque = collections.deque()
            step = 0
            while not np.all(done) and step < max_steps:
                if not queue:  # lerobot: a new chunk for the whole batch when the action queue is empty
                    obs = {k: np.stack([np.stack(h[k]) for h in history]).astype(np.float32, copy=False) for k in keys}
                    chunk_seed = int(np.random.SeedSequence([sample_seed, len(latencies)]).generate_state(1)[0])
                    t0 = time.perf_counter()
                    actions = np.asarray(policy.predict_action(obs, sampler, steps, seed=chunk_seed))
                    latencies.append(time.perf_counter() - t0)
                    if actions.ndim != 3 or actions.shape[0] != batch or actions.shape[1] < ta or actions.shape[2] != 2:
                        raise DpkitError(f"policy returned actions of shape {actions.shape}, expected ({batch}, {ta}, 2)")
                    if not np.all(np.isfinite(actions[:, :ta])):
                        raise DpkitError("policy returned non-finite actions")
                    queue.extend(actions[:, :ta].transpose(1, 0, 2))
                action = queue.popleft()
                r = np.zeros(batch)
                s = np.zeros(batch, dtype=bool)
                ended = np.zeros(batch, dtype=bool)
                for j, env in enumerate(envs):
                    raw, reward, terminated, _, info = env.step(np.asarray(action[j], dtype=np.float64))
                    r[j], s[j] = float(reward), bool(info["is_success"])
                    # The env's TimeLimit is episode_length = max_steps: only the first episode can reach it.
                    ended[j] = bool(terminated) or step + 1 == max_steps
                    if ended[j]:  # SAME_STEP autoreset: the next observation is the new episode's first
                        obs_j, _ = _reset(env, mode, keys, None)
                    else:
                        obs_j = pusht.observe(env, mode, raw, keys)
                    for k, v in obs_j.items():
                        history[j][k].append(v)
                done = ended | done
                if step + 1 == max_steps:
                    done = np.ones_like(done)
                rewards.append(r)
                successes.append(s)
                dones.append(done.copy())
                step += 1
                bar.update(1)
            bar.update(max_steps - step)
            for j, m in enumerate(episode_metrics(np.array(rewards), np.array(successes), np.array(dones))):
                rows.append({"episode_ix": len(rows), "sum_reward": m["sum_reward"], "max_reward": m["max_reward"],
                             "success": m["success"], "seed": batch_seeds_b[j],
                             "start_state": [float(x) for x in starts[j]], "done_step": m["done_step"]})
            shown = rows[:episodes]
            bar.set_postfix(done=len(shown), pc_success=f"{100 * np.mean([e['success'] for e in shown]):.1f}")
    finally:
        bar.close()
        for env in envs:
            env.close()

    per_episode = rows[:episodes]
    eval_s = time.perf_counter() - t_start
    report = {
        "protocol": "lerobot",
        "overall": aggregate(per_episode, eval_s),
        **policy_fields(policy, mode, to, ta, latencies),
        **protocol_fields(episodes, seed_start, max_steps, batch, sample_seed, t_start),
        "per_episode": per_episode,
    }
    if sampler is not None or steps is not None:
        report["sampler"], report["steps"] = sampler, steps
    return report


def format_summary(report: dict[str, Any]) -> str:
    o, n, first = report["overall"], report["n_episodes"], report["seed_start"]
    wins = sum(e["success"] for e in report["per_episode"])
    rows = [
        ("protocol", "lerobot-eval (lerobot 0.6.1): gym-pusht reset(seed) starts, batches in lock step"),
        ("backend", f"{report['backend']} ({report['obs_mode']}, To={report['n_obs_steps']}, Ta={report['n_action_steps']})"),
        ("episodes", f"{n} (seeds {first}..{first + n - 1}, at most {report['max_steps']} steps, "
                     f"batch_size {report['n_envs']})"),
        ("avg_sum_reward", f"{o['avg_sum_reward']:.3f}"),
        ("avg_max_reward", f"{o['avg_max_reward']:.3f}"),
        ("pc_success", f"{o['pc_success']:.1f}  ({wins}/{n} with coverage > {pusht.SUCCESS_COVERAGE})"),
        ("chunk latency", f"{report['mean_chunk_latency_ms']:.2f} ms mean over {report['n_chunks']} batched calls"),
        ("wall time", f"{report['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
