"""Suite-wide settings: small models run fastest (and steadiest on a busy 2-core machine) on one thread."""

import fcntl
import os
from pathlib import Path
from typing import Callable

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


# ---- one tiny policy per observation mode, built and exported once per test run -----------------------
# Most of the suite's time used to be separate ONNX exports; tests that only need *a* valid bundle or
# checkpoint share these (read-only: copy them before damaging anything). Under pytest-xdist (make test
# runs two workers) the first worker to ask builds each one into the run's shared temp folder under a
# lock and the others reuse it, so an export is not paid once per worker.


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` run once per test run, whichever worker asks first; returns the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder every worker's basetemp lives in
    folder = root / f"shared_{name}"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    from synthetic import make_synthetic_pusht

    return built_once(tmp_path_factory, "synthetic_store",
                      lambda d: make_synthetic_pusht(d / "pusht.zarr", n_episodes=3)) / "pusht.zarr"


@pytest.fixture(scope="session")
def train_store(tmp_path_factory) -> Path:
    """A 4-episode synthetic store for the training tests (with synthetic.SMALL_TRAIN)."""
    from synthetic import make_synthetic_pusht

    return make_synthetic_pusht(tmp_path_factory.mktemp("train_data") / "pusht.zarr", n_episodes=4)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, synthetic_store) -> dict[str, Path]:
    """Random-weight `tiny` checkpoints (lowdim, image) fitted to the synthetic store; EMA != raw weights."""
    from dpkit.train.checkpoint import save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.data import load_datasets
    from dpkit.train.policy import DiffusionPolicy

    modes = ("lowdim", "image")

    def build(root: Path) -> None:
        for mode in modes:
            overrides = [f"policy.obs_mode={mode}", f"data.path={synthetic_store}", "policy.down_dims=[32,64]"]
            cfg = load_config("tiny", overrides)
            train, _ = load_datasets(cfg)
            torch.manual_seed(0)
            model = DiffusionPolicy(cfg.policy, train.fit_normalizer())
            ema = DiffusionPolicy(cfg.policy, model.normalizer)
            save_checkpoint(root / f"run_{mode}", 5, model=model, ema_model=ema,
                            state={"config": cfg.to_dict(), "normalizer": model.normalizer.to_dict()})

    root = built_once(tmp_path_factory, "tiny_runs", build)
    return {mode: root / f"run_{mode}" for mode in modes}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_runs) -> dict[str, Path]:
    """The shipped export path (dpkit.export.export_bundle, parity-verified) of `tiny_runs`: samplers
    ddpm-10, ddpm-100 and ddim-2/5/10/100 (default ddim-10)."""
    from dpkit.export import export_bundle

    def build(root: Path) -> None:
        for mode, run in tiny_runs.items():
            export_bundle(run, root / mode, ddim_steps=(2, 5, 10, 100), ddpm_steps=(10,), log=lambda s: None)

    root = built_once(tmp_path_factory, "tiny_bundles", build)
    return {mode: root / mode for mode in tiny_runs}
