"""Make the lerobot_keypoints_x0 fixture with lerobot 0.6.1's own code: `prediction_type: "sample"`
(x0-prediction), on the weights, statistics and observations of ../lerobot_keypoints_ngroups4_ddpm50.

Runs only when asked (never from the tests), in the throwaway venv that made that fixture:

    /tmp/lr/v/bin/python make_lerobot_x0.py --base ../lerobot_keypoints_ngroups4_ddpm50 --out /tmp/x0_fixture

--out receives config.json (lerobot's save_pretrained of the x0 config), reference.npz and facts.json; the
weights and the processor files are the base fixture's, byte for byte (asserted), so they are not stored
again. README.txt beside this file says what each step does. Nothing of lerobot is copied here: this script
imports it.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

STEP_SEED = 0  # torch.manual_seed before sampling, as the base fixture (its DDPM-100 draws are reused)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the lerobot_keypoints_ngroups4_ddpm50 fixture folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base, out = Path(args.base), Path(args.out)
    out.mkdir(parents=True, exist_ok=False)

    import diffusers
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import lerobot
    import safetensors
    import torch
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    base_ref = dict(np.load(base / "reference.npz"))

    # 1. the base fixture as lerobot saved it, read back by lerobot
    src = Path(tempfile.mkdtemp(prefix="x0_base_"))
    for f in base.iterdir():
        if f.name == "config.json" or f.name.startswith("policy_"):
            shutil.copy(f, src / f.name)
    (src / "model.safetensors").write_bytes(lzma.decompress((base / "model.safetensors.xz").read_bytes()))
    base_policy = DiffusionPolicy.from_pretrained(src)
    base_policy.eval()

    # 2. the x0 config: prediction_type "sample", DDPM with num_inference_steps null (all 100 steps); saved by
    #    lerobot with the same weights, which must come back unchanged
    cfg = copy.deepcopy(base_policy.config)
    cfg.prediction_type, cfg.noise_scheduler_type, cfg.num_inference_steps = "sample", "DDPM", None
    policy = DiffusionPolicy(cfg)
    policy.load_state_dict(base_policy.state_dict())
    policy.eval()
    policy.save_pretrained(out)
    saved, orig = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert saved.keys() == orig.keys() and all(torch.equal(saved[k], orig[k]) for k in saved)
    (out / "model.safetensors").unlink()
    stage = Path(tempfile.mkdtemp(prefix="x0_src_"))  # the fixture as the tests assemble it, read back
    for f in src.iterdir():
        shutil.copy(f, stage / f.name)
    shutil.copy(out / "config.json", stage / "config.json")
    policy = DiffusionPolicy.from_pretrained(stage)
    policy.eval()
    assert policy.config.prediction_type == "sample" and policy.diffusion.num_inference_steps == 100
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(stage))

    # 3. references: the base fixture's observations, initial noise and (DDPM) step draws
    obs = {"observation.state": torch.from_numpy(base_ref["obs_state"]),
           "observation.environment_state": torch.from_numpy(base_ref["obs_environment_state"])}
    nb = pre(dict(obs))
    obs_batch = {k: v for k, v in nb.items() if k.startswith("observation.")}
    initial_noise = torch.from_numpy(base_ref["initial_noise"])
    with torch.no_grad():
        gc = policy.diffusion._prepare_global_conditioning(obs_batch)
    assert np.array_equal(gc.numpy(), base_ref["global_cond"])
    ref: dict[str, np.ndarray] = {}
    real_randn = ddpm_mod.randn_tensor
    start, end = cfg.n_obs_steps - 1, cfg.n_obs_steps - 1 + cfg.n_action_steps
    variants = {"x0_ddpm100": ("DDPM", None), "x0_ddim10": ("DDIM", 10)}
    policies, draws_of, x0_seen = {}, {}, {}
    for tag, (kind, k) in variants.items():
        if tag == "x0_ddpm100":  # the saved config itself
            pol = policy
        else:
            c = copy.deepcopy(policy.config)
            c.noise_scheduler_type, c.num_inference_steps = kind, k
            pol = DiffusionPolicy(c)
            pol.load_state_dict(policy.state_dict())
            pol.eval()
        policies[tag] = pol
        draws: list[torch.Tensor] = []

        def recording(*a, _draws=draws, **kw):
            t = real_randn(*a, **kw)
            _draws.append(t.clone())
            return t

        # how many of the network's x0 estimates the clip leaves alone (the test is not only of clamped values)
        outs: list[torch.Tensor] = []
        hook = pol.diffusion.unet.register_forward_hook(lambda _m, _i, o, _outs=outs: _outs.append(o.detach()))
        ddpm_mod.randn_tensor = recording
        try:
            with torch.no_grad():
                torch.manual_seed(STEP_SEED)
                traj = pol.diffusion.conditional_sample(2, global_cond=gc, noise=initial_noise.clone())
                n_draws = len(draws)
                hook.remove()
                pol.reset()
                torch.manual_seed(STEP_SEED)
                chunk = pol.predict_action_chunk(obs_batch, noise=initial_noise.clone())
        finally:
            ddpm_mod.randn_tensor = real_randn
            hook.remove()
        steps = len(pol.diffusion.noise_scheduler.timesteps)
        assert steps == (k or 100) and n_draws == (steps - 1 if kind == "DDPM" else 0), (tag, steps, n_draws)
        assert torch.equal(chunk, traj[:, start:end]), tag
        all_out = torch.stack(outs)
        x0_seen[tag] = {"inside_clip_fraction": float((all_out.abs() < 1).float().mean()),
                        "max_abs": float(all_out.abs().max())}
        draws_of[tag] = draws[:n_draws]
        if kind == "DDPM":  # the same seed and count as the base's DDPM-100: the same draws (not stored twice)
            assert np.array_equal(torch.stack(draws_of[tag]).numpy(), base_ref["ddpm100_step_noise"]), tag
        ref[f"{tag}_trajectory_normalized"], ref[f"{tag}_trajectory"] = traj.numpy(), post(traj).numpy()
        ref[f"{tag}_actions_normalized"], ref[f"{tag}_actions"] = chunk.numpy(), post(chunk).numpy()
        ref[f"{tag}_timesteps"] = pol.diffusion.noise_scheduler.timesteps.numpy().astype(np.int64)

    # 4. lerobot's own float64 run of the same network, input and draws (the base fixture's script does it)
    sys.path.insert(0, str(base.resolve()))
    from make_lerobot_ngroups4 import float64_runs

    for tag, traj64 in float64_runs(policies, policy.state_dict(), draws_of, obs_batch, initial_noise).items():
        ref[f"{tag}_trajectory_normalized_float64"] = traj64
    np.savez_compressed(out / "reference.npz", **ref)

    facts = {
        "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "base_fixture": base.name,
        "weights_equal_to_base": True,
        "step_seed": STEP_SEED,
        "variants": {tag: {"prediction_type": "sample", "noise_scheduler_type": kind, "num_inference_steps": k}
                     for tag, (kind, k) in variants.items()},
        "network_x0_estimates": x0_seen,
        "x0_vs_epsilon_same_weights_normalized": {
            tag: float(np.abs(ref[f"{tag}_trajectory_normalized"]
                              - base_ref[f"{tag[3:]}_trajectory_normalized"]).max()) for tag in variants},
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
    print(json.dumps({k: facts[k] for k in ("versions", "network_x0_estimates", "x0_vs_epsilon_same_weights_normalized",
                                            "float32_vs_float64_max_abs_diff")}, indent=1))


if __name__ == "__main__":
    main()
