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
import sys
from pathlib import Path

import numpy as np
import pytest

from peer_sweep import SWEEP, Sweep, check_script_variants, read_manifest, recorded_samplers

MANIFEST = read_manifest("original_sweep_manifest.json")
ENTRIES = {f["name"]: f for f in MANIFEST["fixtures"]}
EXACT = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "exact"]
REFUSED = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "refused"]
IMAGE = {n for n, f in ENTRIES.items() if f["base"] == "img"}
# the original's network and sampling do not see this value (squaredcos_cap_v2 ignores beta_start / beta_end)
SAME_AS_BASE = {"beta_start_cosine"}
# ort and cpp in `make test`: the low-dim base (one export) and its graph twins whose rule lives in the runtimes'
# own reverse loop (x0-prediction, no clipping, a 30-step DDPM, a DDIM workspace with 8 steps, 50 train steps)
FAST_RUNTIME = {"lowdim_base", "prediction_type_sample", "clip_sample_false", "num_inference_steps_30",
                "ddim_workspace", "num_train_timesteps_50"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    return Sweep(tmp_path_factory.mktemp("original_sweep"), MANIFEST, source_file="latest.ckpt")


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

    script = check_script_variants("make_original_sweep", ENTRIES)
    assert MANIFEST["original_commit"] == script.ORIGINAL_COMMIT
    for name, e in ENTRIES.items():
        files = {p.name for p in sweep.folder(name).iterdir()}
        assert files == ({"latest.ckpt", "reference.npz"} if e["expected"]["outcome"] == "exact" else {"latest.ckpt"})
        cfg = load_torch_zip(sweep.src(name))["cfg"]  # what the original's save_checkpoint pickled
        assert cfg["policy"]["_target_"].startswith("diffusion_policy.policy.diffusion_unet_")
        for path, value in e["cfg_value_check"].items() if e["kind"] != "base" else ():  # the value in the ckpt
            assert _cfg_at(cfg, path) == value == e["value"] or e["field"].endswith("_target_"), (name, path)
    assert (SWEEP / MANIFEST["archive"]).stat().st_size == MANIFEST["archive_bytes"] < 2_000_000


# ---- refused: one line naming the field, nothing written ---------------------------------------------------

@pytest.mark.parametrize("name", REFUSED)
def test_refused_by_name(sweep, name, capsys, tmp_path):
    print(name, sweep.check_refused(name, capsys, tmp_path))


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
    assert {c["sampler"] for c in check["cases"]} == recorded_samplers(entry)
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
    mine, theirs = (dict(np.load(sweep.folder(n) / "reference.npz")) for n in (name, base))
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
    sweep.check_runtime(name, backend)


# ---- the table's figures -----------------------------------------------------------------------------------------

def _measure(root: Path, names: list[str] | None = None) -> list[dict]:
    """Every fixture: the outcome and the largest errors per backend (peer_sweep.Sweep.measure)."""
    return Sweep(root, MANIFEST, source_file="latest.ckpt").measure(names, peer_key="original_float32_px")


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
