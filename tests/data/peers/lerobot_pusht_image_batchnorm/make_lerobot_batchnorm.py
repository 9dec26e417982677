"""Make the lerobot_pusht_image_batchnorm fixture with lerobot 0.6.1's own code (use_group_norm: false).

Runs only when asked (never from the tests), in a throwaway venv beside the project:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lr061
    /tmp/lr061/bin/pip install "lerobot[diffusion]==0.6.1" zarr
    /tmp/lr061/bin/python make_lerobot_batchnorm.py --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip \
        --out /tmp/bn_fixture

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

INIT_SEED = 3
KEEP = 0.03                  # fraction of each ResNet conv weight kept after init (the rest is set to 0)
STAT_EPISODES = (11, 40, 77, 101, 133, 170)   # frames for the train-mode passes that set BN running stats
STAT_PASSES = 12             # train-mode forward passes of the rgb encoder (batches of 8 frames)
REF_EPISODES = (7, 150)      # reference observations: frames FRAME, FRAME + 1 of these episodes
FRAME = 25
NOISE_SEED = 5151            # torch.Generator seed of the injected initial noise
STEP_SEED = 0                # torch.manual_seed before DDPM sampling (per-step draws come from the global RNG)
DENOISER_X_SEED = 9          # np.random.default_rng seed of the denoiser probe input

STATS = {  # invented, float32; image stats per channel (3, 1, 1)
    "observation.image": {"mean": [0.8712, 0.8893, 0.8406], "std": [0.2233, 0.2105, 0.2461],
                          "min": [0.0, 0.0, 0.0], "max": [1.0, 1.0, 1.0]},
    "observation.state": {"min": [12.7, 29.9], "max": [492.4, 501.8], "mean": [268.3, 280.1], "std": [97.2, 103.5]},
    "action": {"min": [9.6, 22.8], "max": [503.1, 509.4], "mean": [270.9, 271.6], "std": [101.7, 99.8]},
}


def open_replay(path: str):
    import zarr

    if path.endswith(".zip"):
        return zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return zarr.open_group(path, mode="r")


def frames(root, episodes, offset, count):
    """(len(episodes), count, 3, 96, 96) images in [0, 1] and (len(episodes), count, 2) agent positions."""
    ends = np.asarray(root["meta/episode_ends"][:])
    starts = np.concatenate([[0], ends[:-1]])
    imgs, states = [], []
    for ep in episodes:
        i = int(starts[ep]) + offset
        imgs.append(np.asarray(root["data/img"][i : i + count], np.float32).transpose(0, 3, 1, 2) / 255.0)
        states.append(np.asarray(root["data/state"][i : i + count, :2], np.float32))
    return np.stack(imgs).astype(np.float32), np.stack(states), [int(starts[ep]) for ep in episodes]


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
    import torchvision
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    torch.set_num_threads(2)
    root = open_replay(args.zarr)
    config = DiffusionConfig(
        input_features={"observation.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 96, 96)),
                        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        crop_shape=(84, 84), use_group_norm=False, pretrained_backbone_weights=None,
        use_separate_rgb_encoder_per_camera=True,
        down_dims=(16, 32, 64), diffusion_step_embed_dim=16, spatial_softmax_num_keypoints=16,
        device="cpu", push_to_hub=False,
    )
    stats = {f: {k: torch.tensor(v, dtype=torch.float32).reshape(3, 1, 1) if f == "observation.image"
                 else torch.tensor(v, dtype=torch.float32) for k, v in s.items()} for f, s in STATS.items()}

    # 1. random init; BatchNorm affine parameters made non-trivial; each conv weight sparsified (size)
    torch.manual_seed(INIT_SEED)
    policy = DiffusionPolicy(config)
    encoder = policy.diffusion.rgb_encoder[0]
    with torch.no_grad():
        for m in encoder.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, torch.nn.Conv2d):
                # masked_fill writes +0.0 (a multiply would leave -0.0 where the weight was negative: a
                # random sign bit per zero that xz cannot compress)
                m.weight.masked_fill_(torch.rand_like(m.weight) >= KEEP, 0.0)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)

    # 2. BatchNorm running statistics from train-mode forward passes over real frames (lerobot's
    #    preprocessor normalizes them; the encoder random-crops in train mode)
    img, state, _ = frames(root, STAT_EPISODES, 10, 16)
    img, state = img.reshape(-1, 3, 96, 96), state.reshape(-1, 2)
    nb = pre({"observation.image": torch.from_numpy(img), "observation.state": torch.from_numpy(state)})
    gen = np.random.default_rng(INIT_SEED)
    encoder.train()
    with torch.no_grad():
        for _ in range(STAT_PASSES):
            idx = torch.from_numpy(gen.choice(len(img), 8, replace=False))
            encoder(nb["observation.image"][idx])
    policy.eval()

    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)

    # 3. references, all from the folder read back
    policy = DiffusionPolicy.from_pretrained(out)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(out))
    obs_image, obs_state, starts = frames(root, REF_EPISODES, FRAME, 2)
    obs = {"observation.image": torch.from_numpy(obs_image), "observation.state": torch.from_numpy(obs_state)}
    nb = pre(dict(obs))
    obs_batch = {k: v for k, v in nb.items() if k.startswith("observation.")}
    first_obs = {k: v[:, 0] for k, v in obs_batch.items()}  # the first env step: frame FRAME only
    batch = dict(obs_batch)
    batch["observation.images"] = torch.stack([nb["observation.image"]], dim=-4)
    initial_noise = torch.randn((2, config.horizon, 2), generator=torch.Generator().manual_seed(NOISE_SEED))
    ref: dict[str, np.ndarray] = {"obs_image": obs_image, "obs_state": obs_state,
                                  "initial_noise": initial_noise.numpy()}
    ref["obs_image_normalized"] = nb["observation.image"].numpy()
    ref["obs_state_normalized"] = nb["observation.state"].numpy()
    with torch.no_grad():
        gc = policy.diffusion._prepare_global_conditioning(batch)
        ref["global_cond"] = gc.numpy()
        ref["rgb_encoder_out"] = policy.diffusion.rgb_encoder[0](nb["observation.image"].flatten(0, 1)).numpy()

    # DDPM-100 (the saved config). diffusers draws the per-step noise with randn_tensor on the global RNG:
    # wrap it to record each draw exactly as the scheduler used it.
    draws: list[torch.Tensor] = []
    real_randn = ddpm_mod.randn_tensor

    def recording(*a, **k):
        t = real_randn(*a, **k)
        draws.append(t.clone())
        return t

    ddpm_mod.randn_tensor = recording
    start, end = config.n_obs_steps - 1, config.n_obs_steps - 1 + config.n_action_steps
    with torch.no_grad():
        torch.manual_seed(STEP_SEED)
        traj = policy.diffusion.conditional_sample(2, global_cond=gc, noise=initial_noise.clone())
        n_draws = len(draws)
        policy.reset()
        torch.manual_seed(STEP_SEED)
        chunk = policy.predict_action_chunk(obs_batch, noise=initial_noise.clone())
    ddpm_mod.randn_tensor = real_randn
    assert n_draws == 99 and torch.equal(chunk, traj[:, start:end]), (n_draws, (chunk - traj[:, start:end]).abs().max())
    ref["ddpm100_actions_normalized"] = chunk.numpy()
    ref["ddpm100_actions"] = post(chunk).numpy()
    ref["ddpm100_trajectory_normalized"] = traj.numpy()
    ref["ddpm100_trajectory"] = post(traj).numpy()
    ref["ddpm100_timesteps"] = policy.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)
    ref["ddpm100_step_noise"] = torch.stack(draws[:99]).numpy()
    ref["ddpm100_replay_max_abs_diff"] = np.float64(replay_ddpm(policy, gc, initial_noise, draws[:99], traj))
    with torch.no_grad():
        policy.reset()
        torch.manual_seed(STEP_SEED)
        first = policy.select_action(first_obs, noise=initial_noise.clone())
    ref["ddpm100_select_action_first_step_normalized"] = first.numpy()
    ref["ddpm100_select_action_first_step"] = post(first).numpy()

    # DDIM-10: the same weights (BatchNorm buffers included) under a DDIM config
    cfg_ddim = copy.deepcopy(policy.config)
    cfg_ddim.noise_scheduler_type, cfg_ddim.num_inference_steps = "DDIM", 10
    pol_ddim = DiffusionPolicy(cfg_ddim)
    pol_ddim.load_state_dict(policy.state_dict())
    pol_ddim.eval()
    with torch.no_grad():
        traj = pol_ddim.diffusion.conditional_sample(2, global_cond=gc, noise=initial_noise.clone())
        pol_ddim.reset()
        chunk = pol_ddim.predict_action_chunk(obs_batch, noise=initial_noise.clone())
        pol_ddim.reset()
        first = pol_ddim.select_action(first_obs, noise=initial_noise.clone())
    assert torch.equal(chunk, traj[:, start:end])
    ref["trajectory_normalized"], ref["trajectory"] = traj.numpy(), post(traj).numpy()
    ref["actions_normalized"], ref["actions"] = chunk.numpy(), post(chunk).numpy()
    ref["ddim_timesteps"] = pol_ddim.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)
    ref["select_action_first_step_normalized"], ref["select_action_first_step"] = first.numpy(), post(first).numpy()

    # lerobot's own float64 run of the same network, input and draws: how far its float32 references are
    # from the exact result (DDIM-10's large steps amplify float32 rounding to ~1e-3 px on this network)
    torch.set_default_dtype(torch.float64)
    pol64, ddim64 = DiffusionPolicy(copy.deepcopy(policy.config)), DiffusionPolicy(copy.deepcopy(cfg_ddim))
    pol64.load_state_dict(policy.state_dict())
    ddim64.load_state_dict(policy.state_dict())
    pol64.double().eval()  # also the spatial-softmax grid, which lerobot builds in float32
    ddim64.double().eval()
    batch64 = {k: v.double() for k, v in batch.items()}
    replayed = iter(draws[:99])
    ddpm_mod.randn_tensor = lambda *a, **k: next(replayed).double()
    with torch.no_grad():
        gc64 = pol64.diffusion._prepare_global_conditioning(batch64)
        traj64 = pol64.diffusion.conditional_sample(2, global_cond=gc64, noise=initial_noise.double())
        ref["ddpm100_trajectory_normalized_float64"] = traj64.numpy()
        gc64 = ddim64.diffusion._prepare_global_conditioning(batch64)
        traj64 = ddim64.diffusion.conditional_sample(2, global_cond=gc64, noise=initial_noise.double())
        ref["trajectory_normalized_float64"] = traj64.numpy()
    ddpm_mod.randn_tensor = real_randn
    torch.set_default_dtype(torch.float32)

    # the denoiser alone
    x = np.random.default_rng(DENOISER_X_SEED).standard_normal((2, config.horizon, 2)).astype(np.float32)
    t = np.array([37, 4], np.int64)
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
    bn = {k: v for k, v in sd.items() if "rgb_encoder" in k and any(s in k for s in ("running_", "num_batches"))}
    convs = [m for m in policy.diffusion.rgb_encoder[0].backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    facts = {
        "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__},
        "seeds": {"init": INIT_SEED, "initial_noise_generator": NOISE_SEED, "ddpm_step_manual_seed": STEP_SEED,
                  "denoiser_x_numpy_default_rng": DENOISER_X_SEED, "stat_pass_choice_numpy_default_rng": INIT_SEED},
        "conv_keep_fraction": KEEP,
        "conv_nonzero_fraction": float(sum(int((m.weight != 0).sum()) for m in convs)
                                       / sum(m.weight.numel() for m in convs)),
        "stat_passes": {"episodes": list(STAT_EPISODES), "frames": "10..25 of each", "passes": STAT_PASSES, "batch": 8},
        "input_frames": {"episodes": list(REF_EPISODES), "frame_offset": FRAME, "episode_start_index": starts},
        "model_safetensors_bytes": len(raw),
        "n_tensors": len(sd),
        "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in sd.items()},
        "batchnorm_buffers": {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                                  "min": float(v.min()), "max": float(v.max())} for k, v in bn.items()},
        "ddpm100_replay_max_abs_diff": float(ref["ddpm100_replay_max_abs_diff"]),
        "float32_vs_float64_max_abs_diff": {
            "ddpm100_trajectory_normalized": float(np.abs(ref["ddpm100_trajectory_normalized"]
                                                          - ref["ddpm100_trajectory_normalized_float64"]).max()),
            "ddim10_trajectory_normalized": float(np.abs(ref["trajectory_normalized"]
                                                         - ref["trajectory_normalized_float64"]).max())},
        "ref_shapes": {k: list(v.shape) for k, v in ref.items()},
        "stats_invented": STATS,
        "config_json": json.loads((out / "config.json").read_text()),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({k: facts[k] for k in ("versions", "conv_nonzero_fraction", "model_safetensors_bytes",
                                            "ddpm100_replay_max_abs_diff", "float32_vs_float64_max_abs_diff")},
                     indent=1))


def replay_ddpm(policy, gc, initial_noise, draws, traj) -> float:
    """A hand-written DDPM update (fixed_small variance, x0 clipped to [-1, 1], epsilon) replaying the
    recorded draws: how far it lands from lerobot's trajectory (0 when the draws are the ones used)."""
    import torch

    sched = policy.diffusion.noise_scheduler
    ac = sched.alphas_cumprod
    x = initial_noise.clone()
    with torch.no_grad():
        for i, t in enumerate(range(99, -1, -1)):
            eps = policy.diffusion.unet(x, torch.full((x.shape[0],), t, dtype=torch.long), global_cond=gc)
            a_t, a_prev = ac[t], ac[t - 1] if t > 0 else torch.tensor(1.0)
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
