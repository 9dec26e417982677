"""Write small random bundles (format version 1) for the C++ and module tests.

    .venv/bin/python cpp/tests/make_test_bundle.py OUT_DIR [--obs-mode lowdim|image|both] [--seed 0]

The graphs are tiny random torch modules with exactly the contract's input/output names
(docs/bundle-format.md), exported with torch.onnx.export(dynamo=True); the schedule arrays and
timesteps come from diffusers, as dpkit-export writes them. Not a trained policy: it only has to be a
deterministic function of (sample, timestep, cond) and of every observation input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

T_TRAIN = 100
SAMPLERS = [("ddpm", 100), ("ddpm", 10), ("ddim", 10), ("ddim", 100)]


class LowdimEncoder(torch.nn.Module):
    def __init__(self, n_obs_steps: int, cond_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(n_obs_steps * 20, cond_dim)

    def forward(self, obs):
        return torch.tanh(self.proj((obs / 256.0 - 1.0).flatten(1)))


class ImageEncoder(torch.nn.Module):
    def __init__(self, n_obs_steps: int, cond_dim: int):
        super().__init__()
        self.img = torch.nn.Linear(n_obs_steps * 3 * 4 * 4, cond_dim)
        self.pos = torch.nn.Linear(n_obs_steps * 2, cond_dim)

    def forward(self, image, agent_pos):
        b, to = image.shape[:2]
        pooled = torch.nn.functional.avg_pool2d(image.reshape(b * to, 3, 96, 96), 24).reshape(b, -1)
        return torch.tanh(self.img(pooled) + self.pos(agent_pos.flatten(1) / 256.0 - 1.0))


class Denoiser(torch.nn.Module):
    """eps = f(sample, timestep, cond): mixes all three so a wrong timestep or cond changes the output."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, width: int = 32):
        super().__init__()
        self.inp = torch.nn.Linear(horizon * action_dim, width)
        self.cond = torch.nn.Linear(cond_dim, width)
        self.time = torch.nn.Linear(8, width)
        self.out = torch.nn.Linear(width, horizon * action_dim)
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(4) / 4))

    def forward(self, sample, timestep, cond):
        b = sample.shape[0]
        arg = timestep.to(torch.float32)[:, None] * self.freqs[None, :]
        temb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
        h = torch.tanh(self.inp(sample.flatten(1)) + self.cond(cond) + self.time(temb))
        return self.out(h).reshape(b, sample.shape[1], sample.shape[2])


def scheduler_json(default: str = "ddim-10") -> dict:
    kw = dict(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2", clip_sample=True,
              prediction_type="epsilon", variance_type="fixed_small")
    ddpm = DDPMScheduler(**kw)
    samplers = []
    for kind, k in SAMPLERS:
        sch = DDPMScheduler(**kw) if kind == "ddpm" else DDIMScheduler(
            num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2", clip_sample=True,
            prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0)
        sch.set_timesteps(k)
        ts = [int(t) for t in sch.timesteps]
        prev = [t - T_TRAIN // k for t in ts]
        final = 1.0 if kind == "ddpm" else float(sch.final_alpha_cumprod)
        samplers.append({"name": f"{kind}-{k}", "sampler": kind, "num_inference_steps": k, "timesteps": ts,
                         "prev_timesteps": [p if p >= 0 else -1 for p in prev], "final_alpha_cumprod": final,
                         "eta": 0.0})
    return {"type": "ddpm", "num_train_timesteps": T_TRAIN, "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
            "variance_type": "fixed_small", "betas": [float(b) for b in ddpm.betas],
            "alphas_cumprod": [float(a) for a in ddpm.alphas_cumprod], "default_sampler": default,
            "samplers": samplers}


def export(module: torch.nn.Module, args: tuple, names: list[str], path: Path, batch_dims: dict) -> None:
    module.eval()
    onnx_program = torch.onnx.export(module, args, input_names=names[:-1], output_names=names[-1:],
                                     dynamic_shapes=batch_dims, dynamo=True, external_data=False,
                                     verbose=False)
    onnx_program.save(str(path))


def make_bundle(out: Path, obs_mode: str = "lowdim", seed: int = 0, n_obs_steps: int = 2, horizon: int = 16,
                n_action_steps: int = 8, action_dim: int = 2, cond_dim: int = 24) -> Path:
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    to, b = n_obs_steps, torch.export.Dim("batch", min=1, max=1024)
    if obs_mode == "lowdim":
        enc = LowdimEncoder(to, cond_dim)
        observations = [{"name": "obs", "shape": [20], "dtype": "float32", "description": "keypoints + agent"}]
        enc_args = (torch.rand(2, to, 20) * 512,)
        enc_dims = {"obs": {0: b}}
    else:
        enc = ImageEncoder(to, cond_dim)
        observations = [
            {"name": "image", "shape": [3, 96, 96], "dtype": "float32", "description": "RGB in [0, 1]"},
            {"name": "agent_pos", "shape": [2], "dtype": "float32", "description": "agent x, y (pixels)"}]
        enc_args = (torch.rand(2, to, 3, 96, 96), torch.rand(2, to, 2) * 512)
        enc_dims = {"image": {0: b}, "agent_pos": {0: b}}
    den = Denoiser(horizon, action_dim, cond_dim)
    enc_names = [o["name"] for o in observations]
    with torch.no_grad():
        export(enc, enc_args, enc_names + ["cond"], out / "encoder.onnx", enc_dims)
        export(den, (torch.randn(2, horizon, action_dim), torch.tensor([5, 7]), torch.randn(2, cond_dim)),
               ["sample", "timestep", "cond", "noise_pred"], out / "denoiser.onnx",
               {"sample": {0: b}, "timestep": {0: b}, "cond": {0: b}})

    def entry(file: str, inputs: list[str], outputs: list[str]) -> dict:
        return {"file": file, "sha256": hashlib.sha256((out / file).read_bytes()).hexdigest(),
                "inputs": inputs, "outputs": outputs, "dtype": "float32"}

    rng = np.random.default_rng(seed)
    manifest = {
        "format": "dpkit-bundle", "format_version": 1, "obs_mode": obs_mode, "n_obs_steps": to,
        "horizon": horizon, "n_action_steps": n_action_steps, "action_dim": action_dim,
        "first_action_index": to - 1, "cond_dim": cond_dim, "observations": observations,
        "action_normalizer": {"scale": [float(v) for v in rng.uniform(200, 260, action_dim)],
                              "offset": [float(v) for v in rng.uniform(240, 270, action_dim)]},
        "scheduler": scheduler_json(),
        "models": {"encoder": entry("encoder.onnx", enc_names, ["cond"]),
                   "denoiser": entry("denoiser.onnx", ["sample", "timestep", "cond"], ["noise_pred"])},
        "export": {"exporter": "cpp/tests/make_test_bundle.py", "opset": 20, "torch_version": torch.__version__,
                   "onnx_version": "", "dpkit_version": "0.1.0", "ema": False, "fp16": False, "created": ""},
        "source": {"checkpoint": "", "step": 0},
        "config": {},
        "parity": {"encoder": 0.0, "denoiser": 0.0, "traj_ddpm": 0.0, "traj_ddim": 0.0},
    }
    (out / "policy.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--obs-mode", choices=["lowdim", "image", "both"], default="lowdim",
                    help="both: write OUT/lowdim and OUT/image in one run (saves a torch import)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.obs_mode == "both":
        for mode in ("lowdim", "image"):
            make_bundle(args.out / mode, mode, args.seed)
    else:
        make_bundle(args.out, args.obs_mode, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
