"""x0-prediction (`policy.prediction_type: sample`) end to end: the training target, then a tiny policy trained,
exported and sampled in every backend.

    .venv/bin/pytest tests/test_prediction_type.py

The reverse step itself is checked against diffusers one step at a time in tests/test_sampling.py (numpy) and
cpp/tests/test_schedule.cpp (C++); here the whole chain: with the same injected noise "torch" (diffusers'
schedulers with prediction_type "sample"), "ort" (the numpy reference) and "cpp" return the same normalized
trajectory within 1e-4 (DDPM-100, DDIM-10, and with an inpainted prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

BACKENDS = ("torch", "ort", "cpp")


def _tiny_policy(prediction_type: str):
    from dpkit.train.config import load_config
    from dpkit.train.normalizer import Normalizer
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config("tiny", ["policy.down_dims=[32,64]", f"policy.prediction_type={prediction_type}"])
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    return DiffusionPolicy(cfg.policy, Normalizer.fit({"action": rng.uniform(12, 511, (64, 2)),
                                                       "obs": rng.uniform(0, 512, (64, 20))}))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_training_target_is_the_noise_or_x0(prediction_type, monkeypatch):
    """The loss is 0 exactly when the denoiser outputs its target: the drawn noise, or the normalized actions."""
    policy = _tiny_policy(prediction_type)
    action = torch.rand(3, 16, 2) * 400 + 50
    batch = {"obs": {"obs": torch.rand(3, 2, 20) * 500}, "action": action}
    x0 = policy.normalizer.normalize("action", action)
    drawn = []
    real_randn_like = torch.randn_like

    def randn_like(t, **kw):  # the training noise, recorded
        drawn.append(real_randn_like(t, **kw))
        return drawn[-1]

    monkeypatch.setattr(torch, "randn_like", randn_like)
    monkeypatch.setattr(policy.denoiser, "forward", lambda noisy, t, cond: x0 if prediction_type == "sample" else drawn[-1])
    assert float(policy(batch)) == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_store) -> tuple[Path, Path]:
    """(run folder, bundle) of a tiny low-dim x0-prediction policy: a few training steps, then dpkit-export."""
    from dpkit.export.cli import main as export_main
    from dpkit.train.cli import main as train_main

    root = tmp_path_factory.mktemp("x0_prediction")
    run, bundle = root / "run", root / "bundle"
    with pytest.raises(SystemExit) as e:
        train_main(["--config", "tiny", "--data", str(synthetic_store), "--out", str(run), "--steps", "4",
                    "--no-progress", "policy.prediction_type=sample", "policy.down_dims=[32,64]",
                    "train.batch_size=8", "train.checkpoint_every=4", "train.val_every=4"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        export_main([str(run), "--out", str(bundle), "--ddim-steps", "10"])
    assert e.value.code == 0
    return run, bundle


def test_bundle_records_the_prediction_type(trained):
    _, bundle = trained
    manifest = json.loads((bundle / "policy.json").read_text())
    assert manifest["scheduler"]["prediction_type"] == "sample"
    assert manifest["config"]["policy"]["prediction_type"] == "sample"
    assert all(v < 1e-4 for v in manifest["parity"].values()), manifest["parity"]  # the exporter's own check


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 10)])
def test_every_backend_samples_the_same_trajectory(trained, sampler, steps):
    from dpkit.runtime import load_policy

    run, bundle = trained
    try:
        import dpkit.runtime._core  # noqa: F401
        names = BACKENDS
    except ImportError:
        names = BACKENDS[:2]
    policies = {"torch": load_policy(run, backend="torch"), "ort": load_policy(bundle, backend="ort", threads=1)}
    if "cpp" in names:
        policies["cpp"] = load_policy(bundle, backend="cpp", threads=1, max_batch=4)
    rng = np.random.default_rng(5)
    batch = 3
    obs = {"obs": (rng.uniform(16, 496, (batch, 2, 20))).astype(np.float32)}
    x_init = rng.standard_normal((batch, 16, 2), dtype=np.float32)
    noise = rng.standard_normal((steps, batch, 16, 2), dtype=np.float32)
    prefix = rng.uniform(-1, 1, (batch, 4, 2)).astype(np.float32)
    for kw in ({}, {"prefix": prefix, "prefix_start": 1, "prefix_weights": np.array([1, 1, 0.5, 0.25])}):
        trajs = {name: p.sample(obs, sampler=sampler, steps=steps, initial_noise=x_init, step_noise=noise, **kw)
                 for name, p in policies.items()}
        for name in names[1:]:
            err = np.abs(trajs[name] - trajs["torch"]).max()
            assert err <= 1e-4, f"{name} vs torch, {sampler}-{steps} {sorted(kw)}: {err:.2e}"
        if kw:  # a weight-1 row of the prefix comes out exactly as committed
            np.testing.assert_allclose(trajs["torch"][:, 1:3], prefix[:, :2], atol=1e-5)
    # not vacuous: the same weights read as epsilon-prediction give another trajectory
    torch_policy = policies["torch"].policy
    torch_policy.cfg.prediction_type = "epsilon"
    try:
        other = policies["torch"].sample(obs, sampler=sampler, steps=steps, initial_noise=x_init, step_noise=noise)
    finally:
        torch_policy.cfg.prediction_type = "sample"
    assert np.abs(other - trajs["torch"]).max() > 1e-2
