"""Suite-wide settings: small models run fastest (and steadiest on a busy 2-core machine) on one thread."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # a runtime-only install has no torch
    pass

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASET = ROOT.parent / "shared" / "data" / "pusht" / "pusht_cchi_v7_replay.zarr.zip"


@pytest.fixture(scope="session")
def real_dataset() -> Path:
    """The real PushT replay in ../shared; tests that need it skip when it is absent."""
    if not SHARED_DATASET.exists():
        pytest.skip(f"real PushT dataset not found at {SHARED_DATASET} (../shared is absent)")
    return SHARED_DATASET
