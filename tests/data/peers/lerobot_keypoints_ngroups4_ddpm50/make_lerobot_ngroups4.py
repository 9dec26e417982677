"""Make the lerobot_keypoints_ngroups4_ddpm50 fixture with lerobot 0.6.1's own code: `n_groups: 4` and DDPM
with `num_inference_steps: 50`, two legal non-default values dpkit-convert once got silently wrong, plus
references for `clip_sample_range: 1.5` and `clip_sample: false` on the same weights.

Runs only when asked (never from the tests), in a throwaway venv beside the project:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lr/v
    /tmp/lr/v/bin/pip install "lerobot[diffusion]==0.6.1" zarr
    /tmp/lr/v/bin/python make_lerobot_ngroups4.py --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip \
        --out /tmp/ng4_fixture

--out receives config.json, model.safetensors.xz (the weights lerobot saved, xz-compressed), the processor
files, reference.npz and facts.json. README.txt beside this file says what each step does. Nothing of
lerobot is copied here: this script imports it.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
from pathlib import Path

import numpy as np

INIT_SEED = 11
REF_EPISODES = (17, 132)     # reference observations: frames FRAME, FRAME + 1 of these episodes
FRAME = 40
NOISE_SEED = 4242            # torch.Generator seed of the injected initial noise
STEP_SEED = 0                # torch.manual_seed before DDPM sampling (per-step draws come from the global RNG)
DENOISER_X_SEED = 5          # np.random.default_rng seed of the denoiser probe input
N_ENV_POINTS = 8             # environment_state: the dataset's first 8 T-block keypoints (16 values)


def open_replay(path: str):
    import zarr

    if path.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return zarr.open_group(path, mode="r")


def features(root) -> dict[str, np.ndarray]:
    """Every step of the dataset as lerobot's PushT keypoint features (float32)."""
    return {"observation.state": np.asarray(root["data/state"][:, :2], np.float32),
            "observation.environment_state": np.asarray(root["data/keypoint"][:, :N_ENV_POINTS], np.float32)
            .reshape(-1, 2 * N_ENV_POINTS),
            "action": np.asarray(root["data/action"][:], np.float32)}


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
    import safetensors
    import torch
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    torch.set_num_threads(2)
    root = open_replay(args.zarr)
    data = features(root)
    # the real dataset statistics of every step (what lerobot's compute_stats gives on this data: min, max,
    # mean, std per feature), float32 like lerobot's
    stats_np = {f: {"min": v.min(0), "max": v.max(0), "mean": v.mean(0, dtype=np.float64).astype(np.float32),
                    "std": v.std(0, dtype=np.float64).astype(np.float32)} for f, v in data.items()}
    stats = {f: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()} for f, s in stats_np.items()}

    config = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV,
                                                                       shape=(2 * N_ENV_POINTS,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        normalization_mapping={"VISUAL": NormalizationMode.MEAN_STD, "STATE": NormalizationMode.MIN_MAX,
                               "ENV": NormalizationMode.MIN_MAX, "ACTION": NormalizationMode.MIN_MAX},
        down_dims=(16, 32, 64), diffusion_step_embed_dim=32, n_groups=4,
        noise_scheduler_type="DDPM", num_inference_steps=50,
        device="cpu", push_to_hub=False,
    )

    # 1. random init; every U-Net GroupNorm gets non-trivial affine parameters (so the final block's
    #    groups and its weights both show in the outputs); every float weight rounded to a bfloat16 value
    #    (kept float32: only so that xz compresses the file; the model computes in float32 as ever)
    torch.manual_seed(INIT_SEED)
    policy = DiffusionPolicy(config)
    unet = policy.diffusion.unet
    with torch.no_grad():
        n_norms = 0
        for m in unet.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                n_norms += 1
        for p in unet.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    final_norm = unet.final_conv[0].block[1]
    assert isinstance(final_norm, torch.nn.GroupNorm) and final_norm.num_groups == 8, final_norm
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    policy.eval()
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)

    # 2. references, all from the folder read back
    policy = DiffusionPolicy.from_pretrained(out)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(out))
    assert policy.diffusion.num_inference_steps == 50
    ends = np.asarray(root["meta/episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]])
    idx = np.stack([np.arange(int(starts[e]) + FRAME, int(starts[e]) + FRAME + 2) for e in REF_EPISODES])
    obs = {k: torch.from_numpy(data[k][idx]) for k in ("observation.state", "observation.environment_state")}
    nb = pre(dict(obs))
    obs_batch = {k: v for k, v in nb.items() if k.startswith("observation.")}
    first_obs = {k: v[:, 0] for k, v in obs_batch.items()}  # the first env step: frame FRAME only
    initial_noise = torch.randn((2, config.horizon, 2), generator=torch.Generator().manual_seed(NOISE_SEED))
    ref: dict[str, np.ndarray] = {"obs_state": obs["observation.state"].numpy(),
                                  "obs_environment_state": obs["observation.environment_state"].numpy(),
                                  "initial_noise": initial_noise.numpy()}
    ref["obs_state_normalized"] = nb["observation.state"].numpy()
    ref["obs_environment_state_normalized"] = nb["observation.environment_state"].numpy()
    with torch.no_grad():
        gc = policy.diffusion._prepare_global_conditioning(obs_batch)
    ref["global_cond"] = gc.numpy()

    # diffusers draws DDPM's per-step noise with randn_tensor on the global RNG: wrap it to record each draw
    # exactly as the scheduler used it
    real_randn = ddpm_mod.randn_tensor
    start, end = config.n_obs_steps - 1, config.n_obs_steps - 1 + config.n_action_steps
    # TAG: (scheduler, num_inference_steps, other config fields); the clip variants check clip_sample_range and
    # clip_sample: false on the same weights (random-init eps makes x0 leave [-1, 1] in the early steps)
    variants = {"ddpm50": ("DDPM", 50, {}), "ddpm100": ("DDPM", None, {}), "ddim10": ("DDIM", 10, {}),
                "clip15_ddpm50": ("DDPM", 50, {"clip_sample_range": 1.5}),
                "clip15_ddim10": ("DDIM", 10, {"clip_sample_range": 1.5}),
                "noclip_ddpm50": ("DDPM", 50, {"clip_sample": False}),
                "noclip_ddim10": ("DDIM", 10, {"clip_sample": False})}
    policies, draws_of = {}, {}
    for tag, (kind, k, fields) in variants.items():
        if tag == "ddpm50":  # the saved config itself
            pol = policy
        else:
            cfg = copy.deepcopy(policy.config)
            cfg.noise_scheduler_type, cfg.num_inference_steps = kind, k
            for key, value in fields.items():
                setattr(cfg, key, value)
            pol = DiffusionPolicy(cfg)
            pol.load_state_dict(policy.state_dict())
            pol.eval()
        policies[tag] = pol
        draws: list[torch.Tensor] = []

        def recording(*a, _draws=draws, **kw):
            t = real_randn(*a, **kw)
            _draws.append(t.clone())
            return t

        ddpm_mod.randn_tensor = recording
        try:
            with torch.no_grad():
                torch.manual_seed(STEP_SEED)
                traj = pol.diffusion.conditional_sample(2, global_cond=gc, noise=initial_noise.clone())
                n_draws = len(draws)
                pol.reset()
                torch.manual_seed(STEP_SEED)
                chunk = pol.predict_action_chunk(obs_batch, noise=initial_noise.clone())
                pol.reset()
                torch.manual_seed(STEP_SEED)
                first = pol.select_action(first_obs, noise=initial_noise.clone())
        finally:
            ddpm_mod.randn_tensor = real_randn
        steps = len(pol.diffusion.noise_scheduler.timesteps)
        want_draws = steps - 1 if kind == "DDPM" else 0  # none at t = 0, none for DDIM (eta 0)
        assert steps == (k or 100) and n_draws == want_draws, (tag, steps, n_draws)
        assert torch.equal(chunk, traj[:, start:end]), (tag, (chunk - traj[:, start:end]).abs().max())
        draws_of[tag] = draws[:n_draws]
        ref[f"{tag}_trajectory_normalized"], ref[f"{tag}_trajectory"] = traj.numpy(), post(traj).numpy()
        ref[f"{tag}_actions_normalized"], ref[f"{tag}_actions"] = chunk.numpy(), post(chunk).numpy()
        ref[f"{tag}_select_action_first_step"] = post(first).numpy()
        ref[f"{tag}_timesteps"] = pol.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)
        if kind == "DDPM" and not fields:
            ref[f"{tag}_step_noise"] = torch.stack(draws_of[tag]).numpy()  # [i] used at timesteps[i]
            ref[f"{tag}_replay_max_abs_diff"] = np.float64(replay_ddpm(pol, gc, initial_noise, draws_of[tag], traj))
        elif kind == "DDPM":  # the same seed, so the same draws as the saved config's DDPM-50 (not stored twice)
            assert all(torch.equal(a, b) for a, b in zip(draws_of[tag], draws_of["ddpm50"], strict=True)), tag

    # 3. lerobot's own float64 run of the same network, input and draws: how far its float32 references are
    #    from the exact result
    for tag, traj64 in float64_runs(policies, policy.state_dict(), draws_of, obs_batch, initial_noise).items():
        ref[f"{tag}_trajectory_normalized_float64"] = traj64

    # the denoiser alone
    x = np.random.default_rng(DENOISER_X_SEED).standard_normal((2, config.horizon, 2)).astype(np.float32)
    t = np.array([71, 3], np.int64)
    with torch.no_grad():
        y = policy.diffusion.unet(torch.from_numpy(x), torch.from_numpy(t), global_cond=gc)
    ref["denoiser_x"], ref["denoiser_t"], ref["denoiser_out"] = x, t, y.numpy()
    np.savez_compressed(out / "reference.npz", **ref)

    # model.safetensors -> model.safetensors.xz (the tests decompress it)
    raw = (out / "model.safetensors").read_bytes()
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 1, "lp": 2, "pb": 2}]  # 4-byte floats
    (out / "model.safetensors.xz").write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, filters=filters))
    (out / "model.safetensors").unlink()

    sd = policy.state_dict()
    facts = {
        "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "seeds": {"init": INIT_SEED, "initial_noise_generator": NOISE_SEED, "ddpm_step_manual_seed": STEP_SEED,
                  "denoiser_x_numpy_default_rng": DENOISER_X_SEED},
        "input_frames": {"episodes": list(REF_EPISODES), "frame_offset": FRAME,
                         "episode_start_index": [int(starts[e]) for e in REF_EPISODES]},
        "statistics_real": {f: {k: v.tolist() for k, v in s.items()} for f, s in stats_np.items()},
        "unet_groupnorms_randomized": n_norms,
        "final_conv_groupnorm": {"num_groups": final_norm.num_groups, "num_channels": final_norm.num_channels},
        "model_safetensors_bytes": len(raw),
        "n_tensors": len(sd),
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in sd.items()},
        "variants": {tag: {"noise_scheduler_type": kind, "num_inference_steps": k, **fields}
                     for tag, (kind, k, fields) in variants.items()},
        "replay_max_abs_diff": {tag: float(ref[f"{tag}_replay_max_abs_diff"]) for tag in ("ddpm50", "ddpm100")},
        "clip_changes_the_result_normalized": {
            tag: float(np.abs(ref[f"{tag}_trajectory_normalized"] - ref[f"{tag.split('_')[1]}_trajectory_normalized"])
                       .max()) for tag in variants if "clip" in tag},
        "float32_vs_float64_max_abs_diff": {
            tag: {"trajectory_normalized": float(np.abs(ref[f"{tag}_trajectory_normalized"]
                                                        - ref[f"{tag}_trajectory_normalized_float64"]).max()),
                  "actions_px": float(np.abs(ref[f"{tag}_actions"] - post(torch.from_numpy(
                      ref[f"{tag}_trajectory_normalized_float64"][:, start:end]).float()).numpy()).max())}
            for tag in variants},
        "ref_shapes": {k: list(v.shape) for k, v in ref.items()},
        "config_json": json.loads((out / "config.json").read_text()),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({k: facts[k] for k in ("versions", "final_conv_groupnorm", "model_safetensors_bytes",
                                            "replay_max_abs_diff", "float32_vs_float64_max_abs_diff",
                                            "clip_changes_the_result_normalized")}, indent=1))


def float64_runs(policies: dict, state_dict, draws_of: dict, obs_batch: dict, initial_noise) -> dict:
    """lerobot's own float64 run of each policy (tag -> its float32 policy) with `state_dict`'s weights, the same
    normalized observations and initial noise, and the recorded DDPM draws replayed: tag -> the normalized
    trajectory (float64). Also used by ../lerobot_keypoints_x0/make_lerobot_x0.py."""
    import copy

    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    real_randn, out = ddpm_mod.randn_tensor, {}
    torch.set_default_dtype(torch.float64)
    try:
        for tag, pol in policies.items():
            pol64 = DiffusionPolicy(copy.deepcopy(pol.config))
            pol64.load_state_dict(state_dict)
            pol64.double().eval()
            replayed = iter(draws_of[tag])
            ddpm_mod.randn_tensor = lambda *a, _r=replayed, **k: next(_r).double()
            with torch.no_grad():
                gc64 = pol64.diffusion._prepare_global_conditioning({k: v.double() for k, v in obs_batch.items()})
                traj64 = pol64.diffusion.conditional_sample(2, global_cond=gc64, noise=initial_noise.double())
            out[tag] = traj64.numpy()
    finally:
        ddpm_mod.randn_tensor = real_randn
        torch.set_default_dtype(torch.float32)
    return out


def replay_ddpm(policy, gc, initial_noise, draws, traj) -> float:
    """A hand-written DDPM update (fixed_small variance, x0 clipped to [-1, 1], epsilon) over the scheduler's
    timesteps, replaying the recorded draws: how far it lands from lerobot's trajectory (0 when the draws
    are the ones used)."""
    import torch

    sched = policy.diffusion.noise_scheduler
    ac = sched.alphas_cumprod
    x = initial_noise.clone()
    with torch.no_grad():
        for i, t in enumerate(int(t) for t in sched.timesteps):
            prev = int(sched.previous_timestep(t))
            eps = policy.diffusion.unet(x, torch.full((x.shape[0],), t, dtype=torch.long), global_cond=gc)
            a_t, a_prev = ac[t], ac[prev] if prev >= 0 else torch.tensor(1.0)
            b_t, b_prev = 1 - a_t, 1 - a_prev
            cur_a = a_t / a_prev
            cur_b = 1 - cur_a
            x0 = ((x - b_t ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
            x = (a_prev ** 0.5 * cur_b / b_t) * x0 + (cur_a ** 0.5 * b_prev / b_t) * x
            if t > 0:
                x = x + torch.clamp(b_prev / b_t * cur_b, min=1e-20) ** 0.5 * draws[i]
    return float((x - traj).abs().max())


if __name__ == "__main__":
    main()
