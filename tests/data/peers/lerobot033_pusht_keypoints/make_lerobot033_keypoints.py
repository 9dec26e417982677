"""Make the lerobot033_pusht_keypoints fixture with lerobot 0.3.3's own code (statistics inside model.safetensors).

Runs only when asked (never from the tests), in a throwaway venv beside the project:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lr033
    /tmp/lr033/bin/pip install "lerobot==0.3.3" zarr
    /tmp/lr033/bin/python make_lerobot033_keypoints.py --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip \
        --out /tmp/kp033_fixture

--out receives config.json, model.safetensors (weights AND the normalization buffers, as 0.3.3 saves them),
reference.npz and facts.json. README.txt beside this file says what each step does. Nothing of lerobot is
copied here: this script imports it.

lerobot 0.3.3's DiffusionModel.conditional_sample takes a generator but no noise, and generate_actions
passes neither: the initial noise is the first torch.randn((B, H, 2)) on the global RNG after
torch.manual_seed(SEED), and DDPM's per-step noises are the next draws. Both are recorded as they are drawn
(wrapping torch.randn in the modeling module and diffusers' randn_tensor in the DDPM scheduler module).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

INIT_SEED = 7
REF_EPISODES = (21, 88)    # agent positions: frames FRAME, FRAME + 1 of these episodes
FRAME = 30
ENV_SEED = 33              # np.random.default_rng seed of the invented block keypoints
SAMPLE_SEED = 1234         # torch.manual_seed right before each sampling call
DENOISER_X_SEED = 12

STATS = {  # invented, float32; 0.3.3 saves only the ones each MIN_MAX feature uses (min, max)
    "observation.state": {"min": [13.1, 27.4], "max": [495.2, 506.9], "mean": [266.4, 273.0], "std": [98.1, 100.6]},
    "observation.environment_state": {"min": [float(40 + 3 * i) for i in range(16)],
                                      "max": [float(450 + 2 * i) for i in range(16)],
                                      "mean": [float(250 + i) for i in range(16)],
                                      "std": [float(90 + i) for i in range(16)]},
    "action": {"min": [10.4, 24.2], "max": [507.5, 500.3], "mean": [270.2, 268.8], "std": [101.3, 99.4]},
}


def open_replay(path: str):
    import zarr

    if path.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return zarr.open_group(path, mode="r")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zarr", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)

    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import lerobot
    import lerobot.policies.diffusion.modeling_diffusion as modeling
    import safetensors
    import torch
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    config = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(16,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        normalization_mapping={"VISUAL": NormalizationMode.MEAN_STD, "STATE": NormalizationMode.MIN_MAX,
                               "ENV": NormalizationMode.MIN_MAX, "ACTION": NormalizationMode.MIN_MAX},
        down_dims=(16, 32, 64), diffusion_step_embed_dim=32, device="cpu", push_to_hub=False,
    )
    stats = {f: {k: torch.tensor(v, dtype=torch.float32) for k, v in s.items()} for f, s in STATS.items()}
    torch.manual_seed(INIT_SEED)
    policy = DiffusionPolicy(config, dataset_stats=stats)
    policy.save_pretrained(out)

    # references, all from the folder read back
    policy = DiffusionPolicy.from_pretrained(out)
    policy.eval()
    saved = load_file(str(out / "model.safetensors"))
    stat_keys = sorted(k for k in saved if k.startswith(("normalize_", "unnormalize_")))
    assert all(bool(torch.isfinite(saved[k]).all()) for k in stat_keys), stat_keys

    root = open_replay(args.zarr)
    ends = np.asarray(root["meta/episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]])
    obs_state = np.stack([np.asarray(root["data/state"][int(starts[e]) + FRAME : int(starts[e]) + FRAME + 2, :2],
                                     np.float32) for e in REF_EPISODES])
    lo = np.asarray(STATS["observation.environment_state"]["min"], np.float32)
    hi = np.asarray(STATS["observation.environment_state"]["max"], np.float32)
    obs_env = (lo + (hi - lo) * np.random.default_rng(ENV_SEED).uniform(0.05, 0.95, (2, 2, 16))).astype(np.float32)
    obs = {"observation.state": torch.from_numpy(obs_state), "observation.environment_state": torch.from_numpy(obs_env)}
    ref: dict[str, np.ndarray] = {"obs_state": obs_state, "obs_environment_state": obs_env}

    # record the draws as lerobot makes them
    inits: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    real_randn, real_randn_tensor = torch.randn, ddpm_mod.randn_tensor

    def randn(*a, **k):
        t = real_randn(*a, **k)
        inits.append(t.clone())
        return t

    def randn_tensor(*a, **k):
        t = real_randn_tensor(*a, **k)
        steps.append(t.clone())
        return t

    modeling.torch = _TorchWithRandn(torch, randn)
    ddpm_mod.randn_tensor = randn_tensor
    try:
        with torch.no_grad():
            nb = policy.normalize_inputs(dict(obs))
            ref["obs_state_normalized"] = nb["observation.state"].numpy()
            ref["obs_environment_state_normalized"] = nb["observation.environment_state"].numpy()
            gc = policy.diffusion._prepare_global_conditioning(nb)
            ref["global_cond"] = gc.numpy()

            # DDPM-100 (the saved config): the normalized trajectory, and the actions through generate_actions
            torch.manual_seed(SAMPLE_SEED)
            traj = policy.diffusion.conditional_sample(2, global_cond=gc)
            assert len(inits) == 1 and len(steps) == 99, (len(inits), len(steps))
            initial_noise, step_noise = inits[0], torch.stack(steps)
            torch.manual_seed(SAMPLE_SEED)
            chunk = policy.diffusion.generate_actions(dict(nb))
            actions = policy.unnormalize_outputs({"action": chunk})["action"]
            start, end = config.n_obs_steps - 1, config.n_obs_steps - 1 + config.n_action_steps
            assert torch.equal(chunk, traj[:, start:end])
            assert torch.equal(inits[1], initial_noise) and torch.equal(torch.stack(steps[99:]), step_noise)
            ref["initial_noise"] = initial_noise.numpy()
            ref["ddpm100_actions_normalized"] = chunk.numpy()
            ref["ddpm100_actions"] = actions.numpy()
            ref["ddpm100_trajectory_normalized"] = traj.numpy()
            ref["ddpm100_trajectory"] = policy.unnormalize_outputs({"action": traj})["action"].numpy()
            ref["ddpm100_step_noise"] = step_noise.numpy()
            ref["ddpm100_replay_max_abs_diff"] = np.float64(replay_ddpm(policy, gc, initial_noise, step_noise, traj))

            # the first env step through select_action (queues filled with copies of frame FRAME)
            policy.reset()
            torch.manual_seed(SAMPLE_SEED)
            first = policy.select_action({k: v[:, 0] for k, v in obs.items()})
            ref["ddpm100_select_action_first_step"] = first.numpy()

            # DDIM-10: the same weights (normalization buffers included) under a DDIM config
            cfg_ddim = copy.deepcopy(policy.config)
            cfg_ddim.noise_scheduler_type, cfg_ddim.num_inference_steps = "DDIM", 10
            pol_ddim = DiffusionPolicy(cfg_ddim)
            pol_ddim.load_state_dict(policy.state_dict())
            pol_ddim.eval()
            inits.clear()
            torch.manual_seed(SAMPLE_SEED)
            traj = pol_ddim.diffusion.conditional_sample(2, global_cond=gc)
            assert torch.equal(inits[0], initial_noise)
            torch.manual_seed(SAMPLE_SEED)
            chunk = pol_ddim.diffusion.generate_actions(dict(nb))
            assert torch.equal(chunk, traj[:, start:end])
            ref["ddim10_trajectory_normalized"] = traj.numpy()
            ref["ddim10_trajectory"] = pol_ddim.unnormalize_outputs({"action": traj})["action"].numpy()
            ref["ddim10_actions"] = pol_ddim.unnormalize_outputs({"action": chunk})["action"].numpy()
            ref["ddim_timesteps"] = pol_ddim.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)

            x = np.random.default_rng(DENOISER_X_SEED).standard_normal((2, config.horizon, 2)).astype(np.float32)
            t = np.array([58, 2], np.int64)
            y = policy.diffusion.unet(torch.from_numpy(x), torch.from_numpy(t), global_cond=gc)
            ref["denoiser_x"], ref["denoiser_t"], ref["denoiser_out"] = x, t, y.numpy()
    finally:
        modeling.torch, ddpm_mod.randn_tensor = torch, real_randn_tensor
    np.savez_compressed(out / "reference.npz", **ref)

    facts = {
        "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "seeds": {"init": INIT_SEED, "sample_manual_seed": SAMPLE_SEED, "environment_state_numpy_default_rng": ENV_SEED,
                  "denoiser_x_numpy_default_rng": DENOISER_X_SEED},
        "input_frames": {"episodes": list(REF_EPISODES), "frame_offset": FRAME,
                         "episode_start_index": [int(starts[e]) for e in REF_EPISODES]},
        "stats_invented": STATS,
        "statistics_buffers": {k: saved[k].tolist() for k in stat_keys},
        "n_tensors": len(saved),
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in saved.items()},
        "ddpm100_replay_max_abs_diff": float(ref["ddpm100_replay_max_abs_diff"]),
        "ref_shapes": {k: list(v.shape) for k, v in ref.items()},
        "config_json": json.loads((out / "config.json").read_text()),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({k: facts[k] for k in ("versions", "ddpm100_replay_max_abs_diff", "n_tensors")}, indent=1))
    print("statistics buffers:", stat_keys)


class _TorchWithRandn:
    """The torch module as lerobot's modeling file sees it, with randn recording its draws."""

    def __init__(self, torch, randn):
        self._torch, self.randn = torch, randn

    def __getattr__(self, name):
        return getattr(self._torch, name)


def replay_ddpm(policy, gc, initial_noise, step_noise, traj) -> float:
    """A hand-written DDPM update (fixed_small variance, x0 clipped to [-1, 1], epsilon) replaying the
    recorded draws: how far it lands from lerobot's trajectory (0 when the draws are the ones used)."""
    import torch

    ac = policy.diffusion.noise_scheduler.alphas_cumprod
    x = initial_noise.clone()
    for i, t in enumerate(range(99, -1, -1)):
        eps = policy.diffusion.unet(x, torch.full((x.shape[0],), t, dtype=torch.long), global_cond=gc)
        a_t, a_prev = ac[t], ac[t - 1] if t > 0 else torch.tensor(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        cur_a = a_t / a_prev
        cur_b = 1 - cur_a
        x0 = ((x - b_t ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
        x = (a_prev ** 0.5 * cur_b / b_t) * x0 + (cur_a ** 0.5 * b_prev / b_t) * x
        if t > 0:
            x = x + torch.clamp(b_prev / b_t * cur_b, min=1e-20) ** 0.5 * step_noise[i]
    return float((x - traj).abs().max())


if __name__ == "__main__":
    main()
