"""Identity check of `dpkit-eval --protocol lerobot` against lerobot 0.6.1's own evaluation code.

Not a pytest file (it needs a second venv with lerobot); its committed output is
tests/data/lerobot_protocol_check.json, which tests/test_lerobot_protocol.py reads.

One lerobot policy (the fixture tests/data/peers/lerobot_keypoints_ngroups4_ddpm50: lerobot 0.6.1's own
save, PushT keypoints, random-init weights, real dataset statistics), switched to DDIM-10 in its
config.json so a chunk is a deterministic function of its initial noise, is evaluated twice:

- lerobot side (a Python 3.12 venv with lerobot[diffusion]==0.6.1 and gym-pusht 0.1.8): lerobot's own
  `make_env(PushtEnv(obs_type="environment_state_agent_pos", episode_length=N), n_envs=B,
  use_async_envs=False)`, `DiffusionPolicy.from_pretrained`, `make_pre_post_processors`,
  `make_env_pre_post_processors` and `lerobot_eval.eval_policy_all` (what lerobot-eval calls), with the
  case's start seed (lerobot-eval's --seed). Only two things are added: `predict_action_chunk` receives the injected noise of chunk c,
  and the vector env's reset records each start state.
- dpkit side (dpkit's venv): the same folder through `dpkit-convert`, loaded with the torch backend and
  evaluated by `dpkit.eval.lerobot_protocol.evaluate_lerobot`, chunk c given the same injected noise.

Chunk c's initial noise (B, horizon, 2) is `np.random.default_rng([NOISE_SEED, c]).standard_normal(...)`
as float32, drawn the same way on both sides (its sha256 is recorded and compared).

Cases: `default` (gym-pusht as it is), and `threshold` (both sides' envs with `success_threshold` lowered,
so that episodes terminate early: it exercises success, the batch's lock step after an episode ends, the
SAME_STEP autoreset and the extra masked step that lerobot counts, and a last batch with dropped episodes).

    .venv/bin/python tests/lerobot_protocol_check.py --lerobot-python /tmp/lrv/bin/python \\
        --out tests/data/lerobot_protocol_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "data" / "peers" / "lerobot_keypoints_ngroups4_ddpm50"
NOISE_SEED = 20
CASES = {
    # name: (episodes, batch_size, max_steps, success_threshold or None, seed)
    "default": (3, 2, 300, None, 1000),
    # Seed 1061's start (success at the first step with threshold 0.1) is followed, in the same env, by an
    # autoreset start whose first step has a reward in (0, 1): the extra masked step shows in sum_reward.
    "threshold": (5, 3, 300, 0.1, 1061),
}


def chunk_noise(c: int, batch: int, horizon: int, action_dim: int = 2) -> np.ndarray:
    return np.random.default_rng([NOISE_SEED, c]).standard_normal((batch, horizon, action_dim)).astype(np.float32)


def _state(env) -> list[float]:
    u = env.unwrapped
    return [float(v) for v in (*u.agent.position, *u.block.position, u.block.angle)]


def prepare_folder(dst: Path) -> None:
    """The lerobot folder: the fixture's files, weights decompressed, config switched to DDIM-10."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE.iterdir():
        if f.name.startswith(("policy_", "config")):
            shutil.copy(f, dst / f.name)
    (dst / "model.safetensors").write_bytes(lzma.decompress((FIXTURE / "model.safetensors.xz").read_bytes()))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["noise_scheduler_type"], cfg["num_inference_steps"] = "DDIM", 10
    (dst / "config.json").write_text(json.dumps(cfg, indent=4))


# ---------------------------------------------------------------------------------------------------
# lerobot side (runs in lerobot's venv)


def run_lerobot(folder: str, episodes: int, batch: int, max_steps: int, threshold: float | None, seed: int) -> dict:
    import torch
    from lerobot.envs.configs import PushtEnv
    from lerobot.envs.factory import make_env, make_env_pre_post_processors
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy_all
    import lerobot

    torch.set_num_threads(1)
    env_cfg = PushtEnv(obs_type="environment_state_agent_pos", episode_length=max_steps)
    envs = make_env(env_cfg, n_envs=batch, use_async_envs=False)
    vec = envs["pusht"][0]
    if threshold is not None:
        for e in vec.envs:
            e.unwrapped.success_threshold = threshold
    starts: list[list[float]] = []
    reset = vec.reset

    def recording_reset(*args, **kwargs):
        out = reset(*args, **kwargs)
        starts.extend(_state(e) for e in vec.envs)
        return out

    vec.reset = recording_reset
    policy = DiffusionPolicy.from_pretrained(folder)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=folder)
    env_pre, env_post = make_env_pre_post_processors(env_cfg, policy.config)
    chunk = policy.predict_action_chunk
    hashes: list[str] = []

    def injected(batch_obs, noise=None):
        assert noise is None
        n = chunk_noise(len(hashes), vec.num_envs, policy.config.horizon)
        hashes.append(hashlib.sha256(n.tobytes()).hexdigest()[:16])
        return chunk(batch_obs, noise=torch.from_numpy(n))

    policy.predict_action_chunk = injected
    torch.manual_seed(seed)  # lerobot-eval's set_seed(cfg.seed); unused with injected noise and DDIM
    with torch.no_grad():
        info = eval_policy_all(envs=envs, policy=policy, env_preprocessor=env_pre, env_postprocessor=env_post,
                               preprocessor=pre, postprocessor=post, n_episodes=episodes, start_seed=seed)
    m = info["per_task"][0]["metrics"]
    per_episode = [{"episode_ix": i, "sum_reward": m["sum_rewards"][i], "max_reward": m["max_rewards"][i],
                    "success": bool(m["successes"][i]), "seed": seed + i, "start_state": starts[i]}
                   for i in range(episodes)]
    overall = {k: v for k, v in info["overall"].items() if k not in ("video_paths", "predicted_video_paths")}
    return {"overall": overall, "per_episode": per_episode, "n_chunks": len(hashes), "noise_sha256": hashes,
            "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "gym_pusht": _version("gym-pusht"), "gymnasium": _version("gymnasium")}}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# ---------------------------------------------------------------------------------------------------
# dpkit side (runs in dpkit's venv)


class _InjectedNoise:
    """A dpkit policy whose chunk c gets `chunk_noise(c)` instead of the noise of its seed."""

    def __init__(self, inner, horizon: int):
        self.inner, self.horizon, self.hashes = inner, horizon, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_action(self, obs, sampler=None, steps=None, *, seed=None):
        batch = len(next(iter(obs.values())))
        n = chunk_noise(len(self.hashes), batch, self.horizon)
        self.hashes.append(hashlib.sha256(n.tobytes()).hexdigest()[:16])
        return self.inner.predict_action(obs, sampler, steps, initial_noise=n)


def run_dpkit(run_dir: str, episodes: int, batch: int, max_steps: int, threshold: float | None, seed: int) -> dict:
    import torch

    from dpkit.eval import lerobot_protocol, pusht
    from dpkit.runtime import load_policy

    torch.set_num_threads(1)
    make_env = pusht.make_env

    def make_env_threshold(mode, *args, **kwargs):
        env = make_env(mode, *args, **kwargs)
        if threshold is not None:
            env.unwrapped.success_threshold = threshold
        return env

    # Recorded only to show the extra masked step at work: the reward of step done + 1 (the next episode's
    # first step after the autoreset), when the batch ran that step.
    metrics, extra = lerobot_protocol.episode_metrics, []

    def recording_metrics(rewards, successes, done):
        out = metrics(rewards, successes, done)
        for j, m in enumerate(out):
            k = m["done_step"] + 1
            extra.append(float(rewards[k, j]) if k < len(rewards) else None)
        return out

    pusht.make_env, lerobot_protocol.episode_metrics = make_env_threshold, recording_metrics
    try:
        inner = load_policy(run_dir, backend="torch", threads=1)
        policy = _InjectedNoise(inner, int(inner.horizon))
        report = lerobot_protocol.evaluate_lerobot(policy, episodes=episodes, seed_start=seed, max_steps=max_steps,
                                                   n_envs=batch, progress=False)
    finally:
        pusht.make_env, lerobot_protocol.episode_metrics = make_env, metrics
    for row, r in zip(report["per_episode"], extra):
        row["extra_step_reward"] = r
    report["noise_sha256"] = policy.hashes
    return report


def compare(lr: dict, dp: dict) -> dict:
    rows = []
    for a, b in zip(lr["per_episode"], dp["per_episode"], strict=True):
        rows.append({
            "seed": a["seed"], "seed_equal": a["seed"] == b["seed"],
            "start_state_equal": a["start_state"] == b["start_state"],
            "lerobot": {k: a[k] for k in ("sum_reward", "max_reward", "success")},
            "dpkit": {k: b[k] for k in ("sum_reward", "max_reward", "success", "done_step", "extra_step_reward")},
            "sum_reward_abs_diff": abs(a["sum_reward"] - b["sum_reward"]),
            "max_reward_abs_diff": abs(a["max_reward"] - b["max_reward"]),
            "success_equal": a["success"] == b["success"],
        })
    keys = ("avg_sum_reward", "avg_max_reward", "pc_success")
    return {
        "per_episode": rows,
        "overall_lerobot": {k: lr["overall"][k] for k in (*keys, "n_episodes")},
        "overall_dpkit": {k: dp["overall"][k] for k in (*keys, "n_episodes")},
        "overall_abs_diff": {k: abs(lr["overall"][k] - dp["overall"][k]) for k in keys},
        "same_metric_names": sorted(k for k in lr["overall"] if k not in ("eval_s", "eval_ep_s"))
        == sorted(k for k in dp["overall"] if k not in ("eval_s", "eval_ep_s")),
        "noise_identical": lr["noise_sha256"] == dp["noise_sha256"],
        "n_chunks": [lr["n_chunks"], dp["n_chunks"]],
        "all_start_states_equal": all(r["start_state_equal"] for r in rows),
        "all_success_equal": all(r["success_equal"] for r in rows),
        "max_sum_reward_abs_diff": max(r["sum_reward_abs_diff"] for r in rows),
        "max_max_reward_abs_diff": max(r["max_reward_abs_diff"] for r in rows),
        "episodes_with_nonzero_extra_step_reward": sum(bool(r["dpkit"]["extra_step_reward"]) for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lerobot-python", help="python of the lerobot 0.6.1 venv (orchestrating mode)")
    p.add_argument("--out", help="write the comparison JSON here")
    p.add_argument("--side", choices=("lerobot",), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=tuple(CASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "lerobot":
        print(json.dumps(run_lerobot(args.folder, *CASES[args.case])))
        return
    if not args.lerobot_python or not args.out:
        p.error("--lerobot-python and --out are required")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = {"fixture": str(FIXTURE.relative_to(FIXTURE.parents[2])), "noise_seed": NOISE_SEED,
              "sampler": "DDIM-10 (config.json switched), initial noise injected per chunk", "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder, run_dir = Path(tmp) / "lerobot", Path(tmp) / "dpkit"
        prepare_folder(folder)
        convert = Path(sys.executable).parent / "dpkit-convert"
        subprocess.run([str(convert), str(folder), "--out", str(run_dir), "--no-progress", "--threads", "1"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        for case, spec in CASES.items():
            out = subprocess.run([args.lerobot_python, __file__, "--side", "lerobot", "--folder", str(folder),
                                  "--case", case], check=True, env=env, capture_output=True, text=True).stdout
            lr = json.loads(out.strip().splitlines()[-1])
            dp = run_dpkit(str(run_dir), *spec)
            result.setdefault("versions", {"lerobot_side": lr["versions"]})
            result["cases"][case] = {"episodes": spec[0], "batch_size": spec[1], "max_steps": spec[2],
                                     "success_threshold": spec[3] if spec[3] is not None else 0.95, "seed": spec[4],
                                     **compare(lr, dp)}
    import torch

    result["versions"]["dpkit_side"] = {"torch": torch.__version__, "numpy": np.__version__,
                                        "gym_pusht": _version("gym-pusht"), "gymnasium": _version("gymnasium")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for case, c in result["cases"].items():
        print(f"{case}: starts equal {c['all_start_states_equal']}, success equal {c['all_success_equal']}, "
              f"max |sum_reward diff| {c['max_sum_reward_abs_diff']:.3g}, max |max_reward diff| "
              f"{c['max_max_reward_abs_diff']:.3g}, noise identical {c['noise_identical']}, overall "
              f"lerobot {c['overall_lerobot']} dpkit {c['overall_dpkit']}")


if __name__ == "__main__":
    main()
