"""Write small random bundles for the C++ and module tests, through the exporter (dpkit.export.writer).

    .venv/bin/python cpp/tests/make_test_bundle.py OUT_DIR [--obs-mode lowdim|image|both] [--seed 0]

Each bundle is a DiffusionPolicy of the `tiny` config (narrower U-Net, see TEST_OVERRIDES) with random
weights (fixed seed) and a normalizer fitted to random PushT-like data, exported, verified and written
by `write_bundle`, the library `dpkit-export` runs: the tests read exactly what users ship. Samplers:
ddpm-100, ddpm-10, ddim-10 (the default), ddim-100. `--obs-mode both` writes OUT/lowdim and OUT/image.
tests/data/golden/make_golden.py builds the golden bundles with the same functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dpkit.export.writer import write_bundle
from dpkit.train.config import load_config

# Narrower than `tiny` itself (64/128/256) so the tests export in seconds; same architecture.
TEST_OVERRIDES = ("policy.down_dims=[32,64]",)
DDIM_STEPS = (10, 100)
DDPM_STEPS = (10,)
T_TRAIN = load_config("tiny").policy.num_train_timesteps


def random_policy(obs_mode: str = "lowdim", seed: int = 0, overrides: tuple[str, ...] = TEST_OVERRIDES):
    """(DiffusionPolicy in eval mode with random weights, its Config): deterministic for a seed."""
    from dpkit.train.normalizer import Normalizer
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config("tiny", [f"policy.obs_mode={obs_mode}", *overrides])
    rng = np.random.default_rng(seed)
    n = 256  # random samples the normalizer is fitted to: actions and positions in PushT's pixel range
    stats = {"action": rng.uniform(12, 511, (n, cfg.policy.action_dim))}
    if obs_mode == "lowdim":
        stats["obs"] = rng.uniform(0, 512, (n, 20))
    else:
        stats["agent_pos"] = rng.uniform(12, 511, (n, 2))
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg.policy, Normalizer.fit(stats)).eval()
    return policy, cfg


def make_bundle(out: Path, obs_mode: str = "lowdim", seed: int = 0, external_data: bool = False,
                overrides: tuple[str, ...] = TEST_OVERRIDES, **kw) -> Path:
    """Export a random policy to `out` (replaced if it is a bundle); returns `out`."""
    policy, cfg = random_policy(obs_mode, seed, overrides)
    kw.setdefault("ddim_steps", DDIM_STEPS)
    kw.setdefault("ddpm_steps", DDPM_STEPS)
    write_bundle(policy, out, config=cfg.to_dict(), source={"checkpoint": "", "step": 0}, force=True,
                 ema=False, external_data=external_data,
                 inputs_desc=f"random inputs only (random test policy, seed {seed})", log=lambda s: None, **kw)
    return Path(out)


def scheduler_json() -> dict:
    """The `scheduler` object of the test bundles (for make_schedule_fixture.py)."""
    from dpkit.export.schedule import build_scheduler

    return build_scheduler(random_policy("lowdim")[0], DDIM_STEPS, DDPM_STEPS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--obs-mode", choices=["lowdim", "image", "both"], default="lowdim",
                    help="both: write OUT/lowdim and OUT/image in one run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.obs_mode == "both":
        for mode in ("lowdim", "image"):
            make_bundle(args.out / mode, mode, args.seed)
    else:
        make_bundle(args.out, args.obs_mode, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
