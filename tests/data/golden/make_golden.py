"""Regenerate the golden bundles and their saved outputs (run only when the format deliberately changes).

    .venv/bin/python tests/data/golden/make_golden.py

Writes, beside this file:
  bundle/            a tiny random low-dim policy (the `tiny` config with a one-level U-Net of width 16), exported by
                     dpkit.export.writer as `dpkit-export --plain-conv` does; samplers ddpm-100,
                     ddpm-10, ddim-10 (default), ddim-100
  bundle_external/   the same policy with its weights in `<graph>.onnx.data` files (listed and hashed)
  reference.npz      observations, injected noise, and what PyTorch (DiffusionPolicy.sample, diffusers'
                     schedulers) returns for them: trajectories and actions for ddim-10 and ddpm-100

tests/test_bundle_contract.py loads the committed bundle with today's readers ("ort", and "cpp" when
built) and must reproduce reference.npz within 1e-4: a change to the manifest format or the reverse step
that old bundles cannot follow fails it. Both bundles are also the valid bases of the damaged-bundle
table (cpp/tests/data/damaged_bundles.json). Regenerating replaces all of it; commit the result
(`git add -f` for the ignored `*.onnx.data`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
OVERRIDES = ("policy.down_dims=[16]", "policy.diffusion_step_embed_dim=16")
SEED = 0
BATCH = 2
SAMPLERS = (("ddim", 10), ("ddpm", 100))


def _make_test_bundle():
    spec = importlib.util.spec_from_file_location("make_test_bundle", ROOT / "cpp" / "tests" / "make_test_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    torch.set_num_threads(1)
    mtb = _make_test_bundle()
    # Plain Conv nodes (--plain-conv): the GEMM lowering's index constants would triple the size.
    mtb.make_bundle(HERE / "bundle", "lowdim", SEED, overrides=OVERRIDES, gemm_conv=False)
    mtb.make_bundle(HERE / "bundle_external", "lowdim", SEED, external_data=True, overrides=OVERRIDES,
                    gemm_conv=False)
    policy, cfg = mtb.random_policy("lowdim", SEED, OVERRIDES)
    p = cfg.policy
    rng = np.random.default_rng(1)
    obs = rng.uniform(50, 450, (BATCH, p.n_obs_steps, 20)).astype(np.float32)
    shape = (BATCH, p.horizon, p.action_dim)
    initial_noise = rng.standard_normal(shape, dtype=np.float32)
    step_noise = rng.standard_normal((p.num_train_timesteps, *shape), dtype=np.float32)
    out = {"obs": obs, "initial_noise": initial_noise, "step_noise": step_noise}
    for sampler, steps in SAMPLERS:
        kw = dict(sampler=sampler, steps=steps, initial_noise=torch.from_numpy(initial_noise),
                  step_noise=torch.from_numpy(step_noise[:steps]))
        out[f"traj_{sampler}_{steps}"] = policy.sample({"obs": torch.from_numpy(obs)}, **kw).numpy()
        out[f"actions_{sampler}_{steps}"] = policy.predict_action({"obs": torch.from_numpy(obs)}, **kw).numpy()
    np.savez_compressed(HERE / "reference.npz", **out)
    sizes = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"wrote {HERE} ({sizes / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
