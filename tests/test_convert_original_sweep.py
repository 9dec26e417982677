"""Issue 18's config-space sweep for the ORIGINAL diffusion_policy code: dpkit-convert on one checkpoint per config
field of its U-Net policies (DiffusionUnetLowdimPolicy, DiffusionUnetHybridImagePolicy) that changes the weights
or the sampling, each saved by the original's own workspace with a non-default legal value
(tests/peers_sweep/make_original_sweep.py; tests/peers_sweep/README.md; original_sweep_manifest.json lists field,
value, the hydra overrides and the expected outcome of each).

The rule: a fixture whose conversion is accepted must match the original, or this file fails. For each fixture:

- expected "exact": `dpkit-convert latest.ckpt --out RUN --check auto` succeeds: the converter's own output check
  (dpkit.convert.check, tests/peer_parity.py's rule) in torch against the original's float64 run of every sampler
  the fixture records (its config's own and the other kind: DDPM and DDIM); then the exported bundle is held to
  the same rule (peer_parity.check_case) in ort and cpp;
- expected "refused": dpkit-convert exits 1 with one `error:` line naming the field, and writes nothing.

Exports are shared: a fixture whose converted network, normalizer and graph-shaping config equal another's (the
sampling fields) reuses that fixture's exported graphs, with its own policy.json written by the exporter's own
build_manifest / build_scheduler. In `make test`: the torch checks but SLOW_TORCH's (image fixtures other than
the GroupNorm and BatchNorm bases; low-dim values a sibling covers), and ort/cpp of the low-dim base and its graph
twins whose rule lives in the runtimes' reverse loop; the rest in `make test-all`.

    .venv/bin/python tests/test_convert_original_sweep.py      # measures every fixture and prints the README table
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import refused
from peer_parity import check_case

SWEEP = Path(__file__).resolve().parent / "peers_sweep"
MANIFEST = json.loads((SWEEP / "original_sweep_manifest.json").read_text())
ENTRIES = {f["name"]: f for f in MANIFEST["fixtures"]}
EXACT = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "exact"]
REFUSED = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "refused"]
IMAGE = {n for n, f in ENTRIES.items() if f["base"] == "img"}
# the original's network and sampling do not see this value (squaredcos_cap_v2 ignores beta_start / beta_end)
SAME_AS_BASE = {"beta_start_cosine"}
# config fields that change no exported graph (the sampler table, the executed slice)
GRAPH_NEUTRAL = ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample", "clip_sample_range",
                 "ddim_steps", "ddpm_steps", "default_sampler", "n_action_steps")
# ort and cpp in `make test`: the low-dim base (one export) and its graph twins whose rule lives in the runtimes'
# own reverse loop (x0-prediction, no clipping, a 30-step DDPM, a DDIM workspace with 8 steps, 50 train steps)
FAST_RUNTIME = {"lowdim_base", "prediction_type_sample", "clip_sample_false", "num_inference_steps_30",
                "ddim_workspace", "num_train_timesteps_50"}


class Sweep:
    """The fixtures extracted once, each converted once (with --check auto) and exported at most once."""

    def __init__(self, root: Path):
        self.root = root
        with lzma.open(SWEEP / MANIFEST["archive"]) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            tar.extractall(root / "src", filter="data")
        self.runs: dict[str, Path] = {}
        self.summaries: dict[str, dict] = {}
        self.bundles: dict[str, Path] = {}
        self.torch: dict[str, object] = {}
        self.truth: dict[tuple, np.ndarray] = {}
        self.networks: dict[str, object] = {}

    def src(self, name: str) -> Path:
        return self.root / "src" / name / "latest.ckpt"

    def run(self, name: str) -> Path:
        """`dpkit-convert latest.ckpt --out RUN --check auto --json S` (the CLI, in process); its summary kept."""
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
                          log=lambda _m: None)
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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    return Sweep(tmp_path_factory.mktemp("original_sweep"))


def _reference(sweep: Sweep, name: str):
    from dpkit.convert.check import read_reference

    return read_reference(sweep.src(name).parent / "reference.npz")


def _recorded_samplers(entry: dict) -> set[str]:
    return {f"{t[:4]}-{t[4:]}" for t in entry["made"]["samplers"]}


def _cfg_at(cfg: dict, path: str):
    cur = cfg
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return "(absent)"
        cur = cur[part]
    return cur


# ---- the manifest, the archive and the script agree ------------------------------------------------------------

def test_manifest_lists_every_variant_of_the_script_and_the_archive_holds_them(sweep):
    from dpkit.convert.unpickle import load_torch_zip

    sys.path.insert(0, str(SWEEP))
    try:
        import make_original_sweep as script
    finally:
        sys.path.remove(str(SWEEP))
    assert [v["name"] for v in script.VARIANTS] == list(ENTRIES)
    for v in script.VARIANTS:
        e = ENTRIES[v["name"]]
        assert (e["field"], e["value"], e["expected"]["outcome"]) == (v["field"], v["value"], v["expect"]), v["name"]
    assert MANIFEST["original_commit"] == script.ORIGINAL_COMMIT
    for name, e in ENTRIES.items():
        files = {p.name for p in sweep.src(name).parent.iterdir()}
        assert files == ({"latest.ckpt", "reference.npz"} if e["expected"]["outcome"] == "exact" else {"latest.ckpt"})
        cfg = load_torch_zip(sweep.src(name))["cfg"]  # what the original's save_checkpoint pickled
        assert cfg["policy"]["_target_"].startswith("diffusion_policy.policy.diffusion_unet_")
        for path, value in e["cfg_value_check"].items() if e["kind"] != "base" else ():  # the value in the ckpt
            assert _cfg_at(cfg, path) == value == e["value"] or e["field"].endswith("_target_"), (name, path)
    assert (SWEEP / MANIFEST["archive"]).stat().st_size == MANIFEST["archive_bytes"] < 2_000_000


# ---- refused: one line naming the field, nothing written ---------------------------------------------------

@pytest.mark.parametrize("name", REFUSED)
def test_refused_by_name(sweep, name, capsys, tmp_path):
    from dpkit.convert.cli import main as convert_main

    out = tmp_path / "run"
    err = refused(convert_main, capsys, [str(sweep.src(name)), "--out", str(out), "--no-progress"],
                  ENTRIES[name]["expected"]["refusal_names"])
    assert not out.exists(), name
    print(name, err)


# ---- exact: converts, and matches the original in torch, ort and cpp ---------------------------------------

# torch checks in `make test-all` only: the image fixtures but the base (a ResNet-18 each) and the low-dim values a
# sibling in `make test` covers (n_action_steps 15, kernel_size 3, down_dims [16], n_obs_steps 3, linear)
SLOW_TORCH = (IMAGE - {"img_base", "obs_encoder_group_norm_false"}) | {
    "n_action_steps_4", "kernel_size_7", "down_dims_3", "n_obs_steps_1", "beta_schedule_scaled_linear"}


def _torch_params():
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_TORCH else [], id=n) for n in EXACT]


@pytest.mark.parametrize("name", _torch_params())
def test_converts_and_matches_the_original_in_torch(sweep, name):
    """dpkit-convert --check auto: the converted torch policy against the original's float64 run of every recorded
    sampler, with tests/peer_parity.py's rule (dpkit.convert.check applies it before anything is written)."""
    run = sweep.run(name)
    check = sweep.summaries[name]["check"]
    assert check["passed"] and check["message"] is None, check
    entry = ENTRIES[name]
    assert {c["sampler"] for c in check["cases"]} == _recorded_samplers(entry)
    for c in check["cases"]:  # the original's float64 run is the exact one; every item of the rule held
        assert c["exact"] == "peer float64" and c["conversion_ok"] and c["rounding_ok"], c
        print(name, "torch", json.dumps({k: c[k] for k in ("sampler", "float64_traj", "dpkit_traj", "dpkit_px",
                                                            "peer_px", "rounding_bound_px")}))
    # the converted policy's default call is the one the original's cfg makes
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["source"]["sampler"] == entry["made"]["default_sampler"]
    choice = sweep.policy(name).resolve_sampler()
    assert f"{choice.sampler}-{choice.num_inference_steps}" == entry["made"]["default_sampler"]
    assert state["source"]["weights"] == entry["made"]["weights"]


def test_batchnorm_encoder_is_converted_as_batchnorm(sweep):
    """obs_encoder_group_norm: false keeps robomimic's BatchNorm ResNet-18: dpkit's encoder_norm "batch" with the
    original's running statistics (the torch check above holds it to the original; here only the mapping)."""
    name = "obs_encoder_group_norm_false"
    assert sweep.policy(name).policy.cfg.encoder_norm == "batch"
    assert sweep.policy("img_base").policy.cfg.encoder_norm == "group"


@pytest.mark.parametrize("name", sorted(SAME_AS_BASE))
def test_values_the_original_ignores_convert_to_the_base_policy(sweep, name, tmp_path):
    """beta_start / beta_end under squaredcos_cap_v2: the original's references are bit for bit the base's, and
    dpkit-convert gives the base's policy (config, normalizer, every tensor)."""
    import torch

    from dpkit.convert.source import convert_policy
    from dpkit.runtime import load_policy

    base = ENTRIES[name]["base"] + "_base"
    mine, theirs = (dict(np.load(sweep.src(n).parent / "reference.npz")) for n in (name, base))
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine), name
    run = Path(convert_policy(sweep.src(name), tmp_path / "run")["out"])
    a, b = load_policy(run, backend="torch").policy, sweep.policy(base).policy
    assert dataclasses.asdict(a.cfg) == dataclasses.asdict(b.cfg) and a.normalizer.to_dict() == b.normalizer.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _runtime_params():
    out = []
    for name in EXACT:
        for backend in ("ort", "cpp"):
            marks = [] if name in FAST_RUNTIME else [pytest.mark.slow]
            out.append(pytest.param(name, backend, marks=marks, id=f"{name}-{backend}"))
    return out


@pytest.mark.parametrize("name, backend", _runtime_params())
def test_matches_the_original_in_the_runtimes(sweep, name, backend):
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    policy = load_policy(sweep.bundle(name), backend=backend)
    choice = policy.resolve_sampler()
    assert f"{choice.sampler}-{choice.num_inference_steps}" == ENTRIES[name]["made"]["default_sampler"]
    ref = _reference(sweep, name)
    for case in ref.cases:
        d = check_case(policy, ref.obs, case, sweep.float64(name, case, ref.obs))
        print(name, backend, f"{case.sampler}-{case.steps}", json.dumps(d))


# ---- the table's figures -----------------------------------------------------------------------------------------

def _measure(root: Path, names: list[str] | None = None) -> list[dict]:
    """Every fixture: the outcome, and for exact ones the largest errors per backend (px from the original's
    float64 run, normalized), as the tests above measure them."""
    import io
    from contextlib import redirect_stderr

    from dpkit.convert.cli import main as convert_main
    from dpkit.runtime import load_policy
    from peer_parity import measure_case

    sw = Sweep(root)
    rows = []
    for name in names or list(ENTRIES):
        e = ENTRIES[name]
        row = {"name": name, "field": e["field"], "value": e["value"], "kind": e["kind"],
               "expected": e["expected"]["outcome"]}
        if e["expected"]["outcome"] == "refused":
            err = io.StringIO()
            with redirect_stderr(err), pytest.raises(SystemExit):
                convert_main([str(sw.src(name)), "--out", str(root / "refused" / name), "--no-progress"])
            row["message"] = err.getvalue().strip()
        else:
            ref = _reference(sw, name)
            for backend in ("torch", "ort", "cpp"):
                pol = sw.policy(name) if backend == "torch" else load_policy(sw.bundle(name), backend=backend)
                ms = [measure_case(pol, ref.obs, c, sw.float64(name, c, ref.obs)) for c in ref.cases]
                row[backend] = {"passed": all(m["passed"] for m in ms), "px": max(m["dpkit_px"] for m in ms),
                                "traj": max(m["dpkit_traj"] for m in ms)}
            row["original_float32_px"] = max(m["peer_px"] for m in ms)
            row["samplers"] = sorted(f"{c.sampler}-{c.steps}" for c in ref.cases)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| field | value | dpkit-convert | max error from the original's float64 run: torch / ort / cpp (px) "
             "| the original's own float32 (px) | fixture |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["expected"] == "refused":
            msg = r["message"].split(": cfg.", 1)[-1] if ": cfg." in r["message"] else r["message"]
            outcome, err, own = f"refused (`{msg}`)", "-", "-"
        else:
            ok = all(r[b]["passed"] for b in ("torch", "ort", "cpp"))
            outcome = "exact" if ok else "MISMATCH"
            err = " / ".join(f"{r[b]['px']:.1e}" for b in ("torch", "ort", "cpp"))
            own = f"{r['original_float32_px']:.1e}"
        lines.append(f"| `{r['field']}` | `{json.dumps(r['value'])}` | {outcome} | {err} | {own} | `{r['name']}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # .venv/bin/python tests/test_convert_original_sweep.py [fixture names]
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = _measure(Path(tempfile.mkdtemp(prefix="original_sweep_")), sys.argv[1:] or None)
    (Path(tempfile.gettempdir()) / "original_sweep_measured.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
