"""dpkit.train: PushT data, the Diffusion Policy model, the trainer and its checkpoints.

    from dpkit.train import load_config, train, load_checkpoint
    summary = train(load_config("tiny", ["train.steps=300"]), "runs/tiny")
    policy, state = load_checkpoint("runs/tiny")        # EMA weights of the latest checkpoint

Names are imported on first use, so `import dpkit.train` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Config": "config",
    "load_config": "config",
    "PushTDataset": "data",
    "load_datasets": "data",
    "resolve_dataset_path": "data",
    "Normalizer": "normalizer",
    "DiffusionPolicy": "policy",
    "train": "trainer",
    "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dpkit.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dpkit.train' has no attribute {name!r}")
