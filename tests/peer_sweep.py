"""The peer config-space sweeps' shared machinery (tests/peers_sweep/): the fixtures of one archive extracted
once, each converted once with `dpkit-convert --check auto` and exported at most once (graph twins share
their graphs). Used by tests/test_convert_lerobot_sweep.py (lerobot 0.6.1), test_convert_lerobot033_sweep.py
and test_convert_original_sweep.py (the original diffusion_policy code's .ckpt files)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

SWEEP = Path(__file__).resolve().parent / "peers_sweep"
# config fields that change no exported graph (the sampler table, the executed slice, training only)
GRAPH_NEUTRAL = ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample", "clip_sample_range",
                 "ddim_steps", "ddpm_steps", "default_sampler", "n_action_steps")


# The exporter's own ONNX-vs-PyTorch bound for these random networks: DDIM-10 carries a per-call float32 difference
# of ~2.5e-6 to 2e-4 (the original sweep's lowdim_base with PyTorch's AVX2 kernels; the default bound is 1e-4).
# What these tests hold each bundle to is check_runtime's: the peer's float64 run, by tests/peer_parity.py's rule.
EXPORT_PARITY_TOLERANCE = 1e-3


def read_manifest(name: str) -> dict:
    return json.loads((SWEEP / name).read_text())


def check_script_variants(script: str, entries: dict[str, dict]) -> ModuleType:
    """The fixture generator tests/peers_sweep/<script>.py, after checking that the manifest lists each of its
    VARIANTS, in order, with the field, value and expected outcome the script made it with."""
    sys.path.insert(0, str(SWEEP))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(SWEEP))
    assert [v["name"] for v in module.VARIANTS] == list(entries)
    for v in module.VARIANTS:
        e = entries[v["name"]]
        assert (e["field"], e["value"], e["expected"]["outcome"]) == (v["field"], v["value"], v["expect"]), v["name"]
    return module


def recorded_samplers(entry: dict) -> set[str]:
    """The samplers a fixture's reference records, as labels ("ddpm-100", "ddim-10")."""
    return {f"{t[:4]}-{t[4:]}" for t in entry["made"]["samplers"]}


class Sweep:
    """The fixtures extracted once, each converted once (with --check auto) and exported at most once."""

    def __init__(self, root: Path, manifest: dict, source_file: str | None = None):
        self.root = root
        self.manifest = manifest
        self.entries = {f["name"]: f for f in manifest["fixtures"]}
        self.source_file = source_file  # the file dpkit-convert is given inside each fixture folder, or the folder
        with lzma.open(SWEEP / manifest["archive"]) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            tar.extractall(root / "src", filter="data")
        self.runs: dict[str, Path] = {}
        self.summaries: dict[str, dict] = {}
        self.bundles: dict[str, Path] = {}
        self.torch: dict[str, object] = {}
        self.truth: dict[tuple, np.ndarray] = {}
        self.networks: dict[str, object] = {}

    def folder(self, name: str) -> Path:
        """The extracted fixture folder (the peer's files and reference.npz)."""
        return self.root / "src" / name

    def src(self, name: str) -> Path:
        """What dpkit-convert is given: the folder, or the named file in it (the original code's latest.ckpt)."""
        return self.folder(name) / self.source_file if self.source_file else self.folder(name)

    def reference(self, name: str):
        from dpkit.convert.check import read_reference

        return read_reference(self.folder(name) / "reference.npz")

    def run(self, name: str) -> Path:
        """`dpkit-convert SRC --out RUN --check auto --json S` (the CLI, in process); its summary is kept."""
        if name not in self.runs:
            from dpkit.convert.cli import main as convert_main

            out, js = self.root / "runs" / name, self.root / "runs" / f"{name}.json"
            with pytest.raises(SystemExit) as e:
                convert_main([str(self.src(name)), "--out", str(out), "--check", "auto", "--no-progress",
                              "--json", str(js)])
            assert e.value.code == 0, name
            self.summaries[name] = json.loads(js.read_text())
            self.runs[name] = out
        return self.runs[name]

    def policy(self, name: str):
        if name not in self.torch:
            from dpkit.runtime import load_policy

            self.torch[name] = load_policy(self.run(name), backend="torch")
        return self.torch[name]

    def float64(self, name: str, case, obs) -> np.ndarray:
        from peer_parity import float64_network, float64_trajectory

        if name not in self.networks:
            self.networks[name] = float64_network(self.policy(name).policy)
        key = (name, case.sampler, case.steps)
        if key not in self.truth:
            self.truth[key] = float64_trajectory(self.networks[name], obs, case)
        return self.truth[key]

    def graph_twin(self, name: str) -> str | None:
        """An already exported fixture whose graphs this one's export would reproduce, or None."""
        import torch

        mine = self.policy(name).policy
        for other in self.bundles:
            theirs = self.policy(other).policy
            a, b = dataclasses.asdict(mine.cfg), dataclasses.asdict(theirs.cfg)
            for f in GRAPH_NEUTRAL:
                a.pop(f, None), b.pop(f, None)
            if a != b or mine.normalizer.to_dict() != theirs.normalizer.to_dict():
                continue
            sa, sb = mine.state_dict(), theirs.state_dict()
            if sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa):
                return other
        return None

    def bundle(self, name: str) -> Path:
        """The converted run exported (DDIM-10 and the config's own sampler listed); a graph twin's graphs with
        this fixture's own policy.json (the exporter's build_manifest and build_scheduler) where one exists."""
        if name in self.bundles:
            return self.bundles[name]
        from dpkit.export.schedule import build_scheduler
        from dpkit.export.writer import build_manifest, export_bundle
        from dpkit.io import atomic_write_json
        from dpkit.runtime.bundle import MANIFEST as MANIFEST_NAME
        from dpkit.train.checkpoint import load_checkpoint

        out = self.root / "bundles" / name
        twin = self.graph_twin(name)
        if twin is None:
            export_bundle(self.run(name), out, ddim_steps=(10,), data=str(self.root / "no_dataset"),
                          parity_tolerance=EXPORT_PARITY_TOLERANCE, log=lambda _m: None)
        else:
            shutil.copytree(self.bundles[twin], out)
            base = json.loads((out / MANIFEST_NAME).read_text())
            policy, state = load_checkpoint(self.run(name))
            source = {"checkpoint": str(state.get("checkpoint_path", "")), "step": int(state.get("step", 0)),
                      "converted_from": state["source"], "graphs_of": twin}
            paths = {g: out / m["file"] for g, m in base["models"].items()}
            manifest = build_manifest(policy, state["config"], source, paths, opset=base["export"]["opset"],
                                      ema=base["export"]["ema"], fp16=False,
                                      scheduler=build_scheduler(policy, ddim_steps=(10,)), tensorrt=base["tensorrt"],
                                      gemm_conv=base["export"]["conv_lowering"] == "gemm")
            manifest["parity"], manifest["parity_details"] = base["parity"], base["parity_details"]
            atomic_write_json(out / MANIFEST_NAME, manifest)
        self.bundles[name] = out
        return out

    def check_refused(self, name: str, capsys, tmp_path: Path) -> str:
        """dpkit-convert exits 1 with one `error:` line holding the manifest's refusal names, and writes nothing."""
        from cli_helpers import refused
        from dpkit.convert.cli import main as convert_main

        out = tmp_path / "run"
        err = refused(convert_main, capsys, [str(self.src(name)), "--out", str(out), "--no-progress"],
                      self.entries[name]["expected"]["refusal_names"])
        assert not out.exists(), name
        return err

    def check_runtime(self, name: str, backend: str) -> None:
        """The exported bundle in `backend` (ort, cpp): the peer's default call, and every recorded sampler held to
        tests/peer_parity.py's rule against the float64 run."""
        from dpkit.runtime import load_policy
        from peer_parity import check_case

        if backend == "cpp":
            pytest.importorskip("dpkit.runtime._core")
        policy = load_policy(self.bundle(name), backend=backend)
        choice = policy.resolve_sampler()
        assert f"{choice.sampler}-{choice.num_inference_steps}" == self.entries[name]["made"]["default_sampler"]
        ref = self.reference(name)
        for case in ref.cases:
            d = check_case(policy, ref.obs, case, self.float64(name, case, ref.obs))
            print(name, backend, f"{case.sampler}-{case.steps}", json.dumps(d))

    def measure(self, names: list[str] | None = None, peer_key: str = "peer_float32_px") -> list[dict]:
        """Every fixture (or `names`): the outcome, and for exact ones the largest errors per backend (px from the
        float64 run, normalized) as the tests measure them, and the peer's own float32 error under `peer_key`.
        Each row is also printed to stderr as it is measured (the sweeps' __main__ prints their README table)."""
        import io
        import sys
        from contextlib import redirect_stderr

        from dpkit.convert.cli import main as convert_main
        from dpkit.runtime import load_policy
        from peer_parity import measure_case

        rows = []
        for name in names or list(self.entries):
            e = self.entries[name]
            row = {"name": name, "field": e["field"], "value": e["value"], "kind": e["kind"],
                   "expected": e["expected"]["outcome"]}
            if e["expected"]["outcome"] == "refused":
                err = io.StringIO()
                with redirect_stderr(err), pytest.raises(SystemExit):
                    convert_main([str(self.src(name)), "--out", str(self.root / "refused" / name), "--no-progress"])
                row["message"] = err.getvalue().strip()
            else:
                ref = self.reference(name)
                for backend in ("torch", "ort", "cpp"):
                    pol = self.policy(name) if backend == "torch" else load_policy(self.bundle(name), backend=backend)
                    ms = [measure_case(pol, ref.obs, c, self.float64(name, c, ref.obs)) for c in ref.cases]
                    row[backend] = {"passed": all(m["passed"] for m in ms), "px": max(m["dpkit_px"] for m in ms),
                                    "traj": max(m["dpkit_traj"] for m in ms)}
                row[peer_key] = max(m["peer_px"] for m in ms)
                row["samplers"] = sorted(f"{c.sampler}-{c.steps}" for c in ref.cases)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        return rows
