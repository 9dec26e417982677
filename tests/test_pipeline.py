"""What a user does, end to end: train a tiny policy → dpkit-export → sample and evaluate in every backend.

    .venv/bin/pytest tests/test_pipeline.py

Training uses the real PushT demonstrations when ../shared is present (CI has it), otherwise a synthetic
store in the same layout. The contract checked here: with the same injected noise, "torch" (PyTorch +
diffusers), "ort" (Python loop) and "cpp" (C++ runtime) return the same normalized trajectory within
1e-4, for DDPM-100 and DDIM-10 at batch 1 and 8, for low-dim and image bundles; and dpkit-eval gives the
same episodes through every backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATASET
from synthetic import make_synthetic_pusht

BACKENDS = ("torch", "ort", "cpp")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    if SHARED_DATASET.exists():
        return SHARED_DATASET
    return make_synthetic_pusht(tmp_path_factory.mktemp("data") / "pusht.zarr", n_episodes=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict[str, tuple[Path, Path]]:
    """(run folder, bundle) per observation mode, from a short real training run and the export CLI."""
    from dpkit.export.cli import main as export_main
    from dpkit.train.cli import main as train_main

    root = tmp_path_factory.mktemp("pipeline")
    out = {}
    for mode, extra in (("lowdim", []), ("image", ["train.batch_size=8"])):
        run, bundle = root / f"run_{mode}", root / f"bundle_{mode}"
        with pytest.raises(SystemExit) as e:
            train_main(["--config", "tiny", "--data", str(data), "--out", str(run), "--steps", "12", "--no-progress",
                        f"policy.obs_mode={mode}", "train.checkpoint_every=6", "train.val_every=6", *extra])
        assert e.value.code == 0
        with pytest.raises(SystemExit) as e:
            export_main([str(run), "--out", str(bundle), "--ddim-steps", "10"])
        assert e.value.code == 0
        out[mode] = (run, bundle)
    return out


def _policies(trained, mode):
    from dpkit.runtime import load_policy

    run, bundle = trained[mode]
    return {
        "torch": load_policy(run, backend="torch"),
        "ort": load_policy(bundle, backend="ort", threads=1),
        "cpp": load_policy(bundle, backend="cpp", threads=1, max_batch=8),
    }


def _obs(policy, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"image": (3, 96, 96), "agent_pos": (2,), "obs": (20,)}
    return {k: (rng.uniform(0, 1, (batch, policy.n_obs_steps, *shapes[k])) * (1 if k == "image" else 480) + (0 if k == "image" else 16)).astype(np.float32)
            for k in policy.obs_keys}


def test_run_and_bundle_are_what_was_asked(trained):
    run, bundle = trained["lowdim"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 12
    manifest = json.loads((bundle / "policy.json").read_text())
    assert manifest["source"]["step"] == 12 and manifest["obs_mode"] == "lowdim"
    assert all(v < 1e-4 for v in manifest["parity"].values()), manifest["parity"]


@pytest.mark.parametrize("mode", ["lowdim", "image"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 10)])
def test_every_backend_samples_the_same_trajectory(trained, mode, sampler, steps):
    policies = _policies(trained, mode)
    rng = np.random.default_rng(3)
    for batch in (1, 8):
        obs = _obs(policies["torch"], batch, rng)
        x0 = rng.standard_normal((batch, 16, 2), dtype=np.float32)
        noise = rng.standard_normal((steps, batch, 16, 2), dtype=np.float32)
        trajs = {name: p.sample(obs, sampler=sampler, steps=steps, initial_noise=x0, step_noise=noise)
                 for name, p in policies.items()}
        for name in ("ort", "cpp"):
            err = np.abs(trajs[name] - trajs["torch"]).max()
            assert err <= 1e-4, f"{name} vs torch, {mode} {sampler}-{steps} batch {batch}: {err:.2e}"
        assert np.abs(trajs["cpp"] - trajs["ort"]).max() <= 1e-4
        # A seed alone also gives every backend the same noise.
        a = {name: p.predict_action(obs, sampler=sampler, steps=steps, seed=11) for name, p in policies.items()}
        assert a["cpp"].shape == (batch, 8, 2)
        assert np.abs(a["cpp"] - a["torch"]).max() < 0.05 and np.abs(a["ort"] - a["torch"]).max() < 0.05  # pixels


def test_evaluation_agrees_across_backends(trained):
    from dpkit.eval.evaluate import evaluate_policy

    reports = {name: evaluate_policy(p, episodes=3, max_steps=24, progress=False, sampler="ddim", steps=10)
               for name, p in _policies(trained, "lowdim").items()}
    for name, rep in reports.items():
        assert rep["backend"] == name and len(rep["episodes"]) == 3
        assert 0.0 <= rep["score"] <= 1.0 and rep["mean_chunk_latency_ms"] > 0
    for name in ("ort", "cpp"):
        assert abs(reports[name]["score"] - reports["torch"]["score"]) <= 0.02
        assert [e["steps"] for e in reports[name]["episodes"]] == [e["steps"] for e in reports["torch"]["episodes"]]


def test_eval_cli_writes_json_for_cpp_bundle(trained, tmp_path):
    from dpkit.eval.evaluate import main as eval_main

    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as e:
        eval_main(["--bundle", str(trained["image"][1]), "--backend", "cpp", "--episodes", "2", "--max-steps", "8",
                   "--steps", "10", "--sampler", "ddim", "--json", str(out), "--quiet"])
    assert e.value.code == 0
    rep = json.loads(out.read_text())
    assert {"score", "success_rate", "backend", "mean_chunk_latency_ms", "episodes"} <= set(rep)
    assert rep["backend"] == "cpp" and [ep["seed"] for ep in rep["episodes"]] == [100000, 100001]
