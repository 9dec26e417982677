"""Issue 18's config-space sweep for lerobot 0.3.3: one small fixture per 0.3.3 DiffusionConfig field that changes
the weights or the sampling, each made by lerobot 0.3.3's own code with a non-default legal value.

lerobot 0.3.3 is the older checkpoint layout: no processor files, the normalization statistics are buffers inside
model.safetensors (`normalize_inputs.buffer_<feature>.<stat>`, `normalize_targets.*`, `unnormalize_outputs.*`),
its MIN_MAX always adds 1e-8 to the range and its unnormalization has no eps at all. Its network code (U-Net, ResNet
encoder, spatial softmax, noise schedulers) is 0.6.1's less `resize_shape` / `crop_ratio` / `gradient_checkpointing` /
`compile_model`, and its `conditional_sample` takes no injected noise.

Runs only when asked (never from the tests), with the python of a throwaway venv that has lerobot 0.3.3:

    ~/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lr033/v
    /tmp/lr033/v/bin/pip install "lerobot==0.3.3" zarr
    OMP_NUM_THREADS=1 /tmp/lr033/v/bin/python tests/peers_sweep/make_lerobot033_sweep.py \\
        --zarr ../shared/data/pusht/pusht_cchi_v7_replay.zarr.zip --out /tmp/sweep033
    # then: cp /tmp/sweep033/manifest.json tests/peers_sweep/manifest033.json
    #       cp /tmp/sweep033/lerobot033_sweep.tar.xz tests/peers_sweep/

The recipe is make_lerobot_sweep.py's (its BASE configs, real PushT statistics, the small weights, the packing and
the manifest's schema are imported from it): only what differs in 0.3.3 is here. The statistics go in through
`DiffusionPolicy(config, dataset_stats=...)` (as tensors: 0.3.3 given numpy arrays shares one array between
normalize_targets and unnormalize_outputs and safetensors then drops one of them); the references are lerobot's own
`normalize_inputs` -> `diffusion._prepare_global_conditioning` -> `diffusion.conditional_sample` (the executed
chunk: `diffusion.generate_actions` -> `unnormalize_outputs`, i.e. `predict_action_chunk` less its observation
queues), with the initial noise injected by handing lerobot's modeling module a `torch.randn` that returns the
recorded draw. The float64 run normalizes in float64 too (lerobot's Normalize with its buffers cast).
Nothing of lerobot is copied here: this script imports it.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_lerobot_sweep import (  # noqa: E402  (the one home of the sweep's shared recipe)
    EXACT, FRAME, NOISE_SEED, REF_EPISODES, REFUSED, STATISTICS_PREFIXES, STEP_SEED, VARIANTS, V, Data,
    build_config, feature_array, field_effect, make_policy, record_randn, resolve, run_sweep, vector_stats)

# Fields of the 0.6.1 sweep that lerobot 0.3.3's DiffusionConfig does not have, and QUANTILES (0.3.3's
# NormalizationMode is MIN_MAX, MEAN_STD, IDENTITY).
NOT_IN_033 = {"gradient_checkpointing_true", "compile_model_true", "crop_ratio_0.9", "resize_shape_88",
              "normalization_action_quantiles"}

# Sampling and architecture code equal to 0.6.1's line for line (the diff of modeling_diffusion.py between the
# two releases is imports, constant names, the noise argument, resize, gradient checkpointing and compile): these
# 0.6.1 variants are covered there and one representative of each group is kept here (kernel_size_3 for
# kernel_size_7, n_obs_steps_3 for n_obs_steps_1, down_dims_3 for down_dims_4, n_action_steps_15 for
# n_action_steps_4, clip_sample_range_1.5 for clip_sample_range_0.5, beta_start_linear for beta_end_linear).
SAME_CODE_AS_061 = {"kernel_size_7", "n_obs_steps_1", "down_dims_4", "n_action_steps_4", "clip_sample_range_0.5",
                    "beta_end_linear"}

ONLY_033 = [  # the older layout's own cases, listed after normalization_state_identity
    V("normalization_action_identity", "kp", "normalization_mapping.ACTION", "IDENTITY", EXACT,
      fields={"normalization_mapping": {"ACTION": "IDENTITY"}}, kind="normalization",
      note="no action buffers at all in model.safetensors (0.3.3 registers none for IDENTITY)"),
    V("normalization_mapping_default", "kp", "normalization_mapping", "0.3.3 default (no ENV entry)", EXACT,
      fields={"normalization_mapping": {"ENV": None}}, kind="normalization",
      note="lerobot's default mapping has no ENV entry: the environment state goes in unnormalized and "
           "model.safetensors has no buffer for it"),
]
VARIANTS = [v for v in VARIANTS if v["name"] not in NOT_IN_033 | SAME_CODE_AS_061]
VARIANTS[[v["name"] for v in VARIANTS].index("normalization_state_identity") + 1:0] = ONLY_033


def _resolve033(variant: dict) -> dict:
    """make_lerobot_sweep.resolve, with a normalization_mapping entry of None meaning "absent"."""
    spec = resolve(variant)
    spec["normalization_mapping"] = {k: v for k, v in spec["normalization_mapping"].items() if v is not None}
    return spec


@contextmanager
def injected_noise(noise):
    """lerobot 0.3.3's conditional_sample draws its initial noise with torch.randn and takes none: its modeling
    module is handed a torch whose randn returns `noise` (cast to the requested dtype), counting the calls."""
    import lerobot.policies.diffusion.modeling_diffusion as modeling
    import torch

    calls = []

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def randn(*a, size=None, dtype=None, device=None, generator=None, **k):
            shape = tuple(size if size is not None else a)
            assert shape == tuple(noise.shape), (shape, tuple(noise.shape))
            calls.append(shape)
            return noise.to(dtype or noise.dtype).clone()

    real = modeling.torch
    modeling.torch = _Torch()
    try:
        yield calls
    finally:
        modeling.torch = real


def _normalized(policy, obs: dict) -> dict:
    """lerobot 0.3.3's select_action before its queues: normalize_inputs, cameras stacked."""
    import torch

    nb = policy.normalize_inputs(dict(obs))
    if policy.config.image_features:
        nb["observation.images"] = torch.stack([nb[k] for k in policy.config.image_features], dim=-4)
    return nb


def sample_case(policy, kind: str, k: int, obs: dict, gc, noise):
    """lerobot 0.3.3's float32 trajectory and executed chunk (normalized and in px) for one sampler (a config copy
    with that scheduler, the same weights and statistics buffers)."""
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    cfg = copy.deepcopy(policy.config)
    cfg.noise_scheduler_type, cfg.num_inference_steps = kind.upper(), k
    pol = DiffusionPolicy(cfg)
    pol.load_state_dict(policy.state_dict())
    pol.eval()
    draws, restore = record_randn()
    try:
        with torch.no_grad(), injected_noise(noise) as calls:
            torch.manual_seed(STEP_SEED)
            traj = pol.diffusion.conditional_sample(2, global_cond=gc)
            n = len(draws)
            torch.manual_seed(STEP_SEED)
            chunk = pol.diffusion.generate_actions(_normalized(pol, obs))
            actions = pol.unnormalize_outputs({"action": chunk})["action"]
    finally:
        restore()
    steps = len(pol.diffusion.noise_scheduler.timesteps)
    assert steps == k and n == (k - 1 if kind == "ddpm" else 0) and len(calls) == 2, (kind, k, steps, n, calls)
    assert all(torch.equal(a, b) for a, b in zip(draws[:n], draws[n:], strict=True))
    s = cfg.n_obs_steps - 1
    assert torch.equal(chunk, traj[:, s:s + cfg.n_action_steps])
    return pol, traj, chunk, actions, draws[:n]


def float64_run(pol, draws, obs, noise):
    """lerobot 0.3.3's own float64 run of `pol` (its config, weights and statistics buffers): the raw observations
    normalized in float64 by its Normalize, the same initial noise and DDPM draws."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    real = ddpm_mod.randn_tensor
    torch.set_default_dtype(torch.float64)
    try:
        pol64 = DiffusionPolicy(copy.deepcopy(pol.config))
        pol64.load_state_dict(pol.state_dict())
        pol64.double().eval()
        replay = iter(draws)
        ddpm_mod.randn_tensor = lambda *a, **k: next(replay).double()
        with torch.no_grad(), injected_noise(noise.double()):
            nb = _normalized(pol64, {k: v.double() for k, v in obs.items()})
            gc64 = pol64.diffusion._prepare_global_conditioning(nb)
            traj64 = pol64.diffusion.conditional_sample(2, global_cond=gc64)
    finally:
        ddpm_mod.randn_tensor = real
        torch.set_default_dtype(torch.float32)
    return traj64.numpy()


def make_fixture(variant: dict, out: Path, data: Data, stats: dict, base_sd: dict | None, bn_images) -> dict:
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from safetensors.torch import load_file

    spec = _resolve033(variant)
    config = build_config(spec)
    feats = spec["features"]
    ds = {"action": stats["action"]}
    for f, (t, shape) in feats.items():
        ds[f] = stats["image"] if t == "VISUAL" else vector_stats(feature_array(data, f, shape))
    # tensors, each its own (see the module docstring); images' statistics per channel, (3, 1, 1)
    ds_t = {f: {k: torch.tensor(np.array(v, np.float32)).reshape(3, 1, 1) if feats.get(f, ("",))[0] == "VISUAL"
                else torch.tensor(np.array(v, np.float32)) for k, v in s.items()} for f, s in ds.items()}
    policy, shared = make_policy(config, base_sd, data, None, bn_images,
                                 new_policy=lambda: DiffusionPolicy(config, dataset_stats=ds_t))
    out.mkdir(parents=True)
    policy.save_pretrained(out)
    saved = load_file(str(out / "model.safetensors"))
    buffers = sorted(k for k in saved if k.startswith(STATISTICS_PREFIXES))
    assert all(bool(torch.isfinite(saved[k]).all()) for k in buffers), buffers
    rec = {"tensors": len(saved), "tensors_shared_with_base": shared,
           "model_safetensors_bytes": (out / "model.safetensors").stat().st_size, "statistics_buffers": buffers}
    if variant["expect"] == REFUSED:
        if not variant["store_weights"]:
            (out / "model.safetensors").unlink()
            rec["weights"] = "not stored: refused from config.json before the weights are read"
        return rec | {"state_dict": policy.state_dict()}

    # references, all from the folder read back (statistics from its buffers)
    policy = DiffusionPolicy.from_pretrained(out)
    policy.eval()
    cfg = policy.config
    idx = np.stack([np.arange(int(data.starts[e]) + FRAME, int(data.starts[e]) + FRAME + cfg.n_obs_steps)
                    for e in REF_EPISODES])
    obs, ref = {}, {}
    for f, (t, shape) in feats.items():
        a = data.images(idx) if t == "VISUAL" else feature_array(data, f, shape)[idx]
        obs[f] = torch.from_numpy(np.ascontiguousarray(a))
        ref["obs_" + f[len("observation."):]] = a
    noise = torch.randn((2, cfg.horizon, 2), generator=torch.Generator().manual_seed(NOISE_SEED))
    ref["initial_noise"] = noise.numpy()
    with torch.no_grad():
        gc = policy.diffusion._prepare_global_conditioning(_normalized(policy, obs))
    ref["global_cond"] = gc.numpy()

    T = cfg.num_train_timesteps
    own = (cfg.noise_scheduler_type.lower(), cfg.num_inference_steps or T)
    other = ("ddim", 10) if own[0] == "ddpm" else ("ddpm", T)
    cases, unavailable = {}, {}
    for kind, k in (own, other):
        try:
            pol, traj, chunk, actions, draws = sample_case(policy, kind, k, obs, gc, noise)
        except NotImplementedError as e:  # e.g. diffusers' DDIMScheduler has no sigmoid schedule
            assert (kind, k) == other, e
            unavailable[f"{kind}{k}"] = f"lerobot cannot build it: {e}"
            continue
        tag = f"{kind}{k}"
        ref[f"{tag}_trajectory_normalized"], ref[f"{tag}_actions"] = traj.numpy(), actions.numpy()
        ref[f"{tag}_actions_normalized"] = chunk.numpy()
        ref[f"{tag}_timesteps"] = pol.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)
        if kind == "ddpm":
            ref[f"{tag}_step_noise"] = torch.stack(draws).numpy()
        t64 = float64_run(pol, draws, obs, noise)
        ref[f"{tag}_trajectory_normalized_float64"] = t64
        s = cfg.n_obs_steps - 1
        with torch.no_grad():
            px64 = pol.unnormalize_outputs({"action": torch.from_numpy(t64[:, s:s + cfg.n_action_steps]).float()})
        px64 = px64["action"].numpy()
        cases[tag] = {"lerobot_float32_vs_float64_normalized": float(np.abs(traj.numpy() - t64).max()),
                      "lerobot_float32_vs_float64_px": float(np.abs(ref[f"{tag}_actions"] - px64).max()),
                      "trajectory_abs_max_normalized": float(np.abs(t64).max())}
        effect = field_effect(variant, pol, kind, k, draws, obs, noise, t64, run64=float64_run)
        if effect is not None:
            cases[tag]["field_effect_normalized"] = effect
    np.savez_compressed(out / "reference.npz", **ref)
    return rec | {"samplers": cases, "samplers_lerobot_refuses": unavailable, "default_sampler": f"{own[0]}-{own[1]}",
                  "state_dict": policy.state_dict()}


def main() -> None:
    run_sweep(VARIANTS, make_fixture, "lerobot033_sweep.tar.xz", "tests/peers_sweep/make_lerobot033_sweep.py")


if __name__ == "__main__":
    main()
