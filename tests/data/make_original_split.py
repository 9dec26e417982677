"""Regenerate original_split.json: the train/val episodes the original diffusion_policy code picks.

Runs the original repository's own split functions (never copied into dpkit), so the test of
`data.split=original` compares against that code, not against our reading of it. Only when asked:

    git clone https://github.com/real-stanford/diffusion_policy /tmp/dp   # checked at commit 5ba07ac
    python tests/data/make_original_split.py /tmp/dp
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

CASES = [  # (n_episodes, val_ratio, seed, max_train_episodes): PushT's 206 with its configs, and edge cases
    (206, 0.02, 42, 90), (206, 0.02, 42, None), (206, 0.02, 0, 90), (206, 0.1, 7, 50),
    (206, 0.0, 42, 90), (5, 0.5, 3, None), (2, 0.9, 1, None), (10, 0.02, 42, 3),
]


def main(repo: str) -> None:
    sys.modules.setdefault("numba", types.SimpleNamespace(jit=lambda *a, **k: (lambda f: f)))  # unused here
    sys.modules.setdefault("zarr", types.ModuleType("zarr"))
    path = Path(repo) / "diffusion_policy/common/sampler.py"
    spec = importlib.util.spec_from_file_location("original_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["diffusion_policy.common.replay_buffer"] = types.SimpleNamespace(ReplayBuffer=object)
    spec.loader.exec_module(mod)
    out = []
    for n, ratio, seed, max_n in CASES:
        val = mod.get_val_mask(n_episodes=n, val_ratio=ratio, seed=seed)
        train = mod.downsample_mask(mask=~val, max_n=max_n, seed=seed)
        out.append({"n_episodes": n, "val_ratio": ratio, "seed": seed, "max_train_episodes": max_n,
                    "train": np.flatnonzero(train).tolist(), "val": np.flatnonzero(val).tolist()})
    dest = Path(__file__).with_name("original_split.json")
    dest.write_text(json.dumps({"source": "real-stanford/diffusion_policy@5ba07ac diffusion_policy/common/sampler.py",
                                "cases": out}, indent=None) + "\n")
    print(f"wrote {dest} ({len(out)} cases)")


if __name__ == "__main__":
    main(sys.argv[1])
