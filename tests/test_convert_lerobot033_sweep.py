"""Issue 18's config-space sweep for lerobot 0.3.3: dpkit-convert on one fixture per lerobot 0.3.3 DiffusionConfig
field that changes the weights or the sampling, each made by lerobot 0.3.3's own code with a non-default legal value
(tests/peers_sweep/make_lerobot033_sweep.py; tests/peers_sweep/README.md; manifest033.json lists field, value,
lerobot version and the expected outcome of each). 0.3.3 is the older layout: config.json and model.safetensors,
the statistics as buffers inside it, no processor files.

The rule is tests/test_convert_lerobot_sweep.py's (this file uses tests/peer_sweep.py's Sweep with manifest033.json): a fixture
whose conversion is accepted must match lerobot (`dpkit-convert --check auto`, tests/peer_parity.py's rule, in
torch; ort and cpp on the exported bundle), and a value dpkit cannot represent is refused with one `error:` line
naming the field, writing nothing. Converting and being wrong fails.

    .venv/bin/python tests/test_convert_lerobot033_sweep.py    # measures every fixture and prints the README table
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from peer_sweep import SWEEP, Sweep, check_script_variants, read_manifest, recorded_samplers
from test_convert_lerobot_sweep import _measure, markdown

MANIFEST = read_manifest("manifest033.json")
ENTRIES = {f["name"]: f for f in MANIFEST["fixtures"]}
EXACT = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "exact"]
REFUSED = [n for n, f in ENTRIES.items() if f["expected"]["outcome"] == "refused"]
LAYOUT = "model.safetensors buffers (lerobot <= 0.3)"
MARKER = "sweep033"  # the README rows' last cell: `sweep033: <fixture>`
# lerobot's network and sampling do not see these values: their references equal the base's (asserted below)
SAME_AS_BASE = {n for n, f in ENTRIES.items() if f["kind"] in ("training-only", "inference-only")} | {
    "beta_start_cosine", "use_separate_rgb_encoder_per_camera_false"}
# In `make test`, the fixtures whose translation is 0.3.3's own: the statistics read from model.safetensors' buffers
# (MIN_MAX, whose range 0.3.3 always widens by 1e-8; MEAN_STD, which 0.3.3 unnormalizes as x * std + mean;
# IDENTITY and the default mapping, with no buffer at all; the image's per-channel mean/std or none). The other
# fields' network and sampling code is lerobot 0.6.1's line for line (see make_lerobot033_sweep.py) and
# tests/test_convert_lerobot_sweep.py holds 0.6.1's fixture of each in `make test`; here they run in `make test-all`,
# as do the runtimes (an export each) of every fixture but the keypoint base.
FAST_TORCH = {"kp_base", "normalization_state_mean_std", "normalization_action_mean_std", "normalization_state_identity",
              "normalization_action_identity", "normalization_mapping_default", "img_base",
              "normalization_visual_identity"}
FAST_RUNTIME = {"kp_base"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    return Sweep(tmp_path_factory.mktemp("lerobot033_sweep"), MANIFEST)


# ---- the manifest, the archive and the script agree ------------------------------------------------------------

def test_manifest_lists_every_variant_of_the_script_and_the_archive_holds_them(sweep):
    check_script_variants("make_lerobot033_sweep", ENTRIES)
    assert all(e["lerobot_version"] == MANIFEST["lerobot_version"] == "0.3.3" for e in ENTRIES.values())
    for name, e in ENTRIES.items():
        files = {p.name for p in sweep.src(name).iterdir()}
        # the older layout: no processor files; the statistics are buffers in model.safetensors
        assert not {f for f in files if f.startswith("policy_")}, (name, files)
        cfg = json.loads((sweep.src(name) / "config.json").read_text())
        assert cfg["type"] == "diffusion" and "resize_shape" not in cfg and "compile_model" not in cfg
        for field, value in e["config_json_value_check"].items():  # lerobot saved the value the manifest names
            assert cfg[field] == value, (name, field)
        if e["expected"]["outcome"] == "exact":
            assert {"model.safetensors", "reference.npz"} <= files, name
            assert any(k.startswith("normalize_inputs.") for k in e["made"]["statistics_buffers"]), name
    assert (SWEEP / MANIFEST["archive"]).stat().st_size == MANIFEST["archive_bytes"]
    assert MANIFEST["archive_bytes"] < 2_000_000


# ---- refused: one line naming the field, nothing written ---------------------------------------------------

@pytest.mark.parametrize("name", REFUSED)
def test_refused_by_name(sweep, name, capsys, tmp_path):
    print(name, sweep.check_refused(name, capsys, tmp_path))


# ---- exact: converts, and matches lerobot in torch, ort and cpp --------------------------------------------

def _torch_params():
    return [pytest.param(n, marks=[] if n in FAST_TORCH else [pytest.mark.slow], id=n) for n in EXACT]


@pytest.mark.parametrize("name", _torch_params())
def test_converts_and_matches_lerobot_in_torch(sweep, name):
    """dpkit-convert --check auto: the converted torch policy against lerobot 0.3.3's float64 run of every recorded
    sampler, with tests/peer_parity.py's rule (dpkit.convert.check applies it before anything is written); the
    statistics came from model.safetensors' buffers."""
    run = sweep.run(name)
    check = sweep.summaries[name]["check"]
    assert check["passed"] and check["message"] is None, check
    entry = ENTRIES[name]
    assert {c["sampler"] for c in check["cases"]} == recorded_samplers(entry)
    for c in check["cases"]:  # lerobot's float64 run is the exact one; every item of the rule held
        assert c["exact"] == "peer float64" and c["conversion_ok"] and c["rounding_ok"], c
        print(name, "torch", json.dumps({k: c[k] for k in ("sampler", "float64_traj", "dpkit_traj", "dpkit_px",
                                                            "peer_px", "rounding_bound_px")}))
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert state["source"]["version"] == LAYOUT
    assert state["source"]["sampler"] == entry["made"]["default_sampler"]
    choice = sweep.policy(name).resolve_sampler()
    assert f"{choice.sampler}-{choice.num_inference_steps}" == entry["made"]["default_sampler"]


@pytest.mark.parametrize("name", sorted(SAME_AS_BASE))
def test_fields_lerobot_ignores_at_inference_convert_to_the_base_policy(sweep, name, tmp_path):
    """Fields that change neither lerobot 0.3.3's network nor its sampling (training-only, beta_start under the
    cosine schedule, the shared encoder's tensor names): lerobot's own references are bit for bit the base
    fixture's, and dpkit-convert gives the base's policy (config, normalizer, every tensor)."""
    import torch

    from dpkit.convert.source import convert_policy
    from dpkit.runtime import load_policy

    base = ENTRIES[name]["base"] + "_base"
    mine, theirs = (dict(np.load(sweep.src(n) / "reference.npz")) for n in (name, base))
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine), name
    run = Path(convert_policy(sweep.src(name), tmp_path / "run")["out"])
    a, b = load_policy(run, backend="torch").policy, sweep.policy(base).policy
    ca, cb = dataclasses.asdict(a.cfg), dataclasses.asdict(b.cfg)
    assert ca == cb and a.normalizer.to_dict() == b.normalizer.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _runtime_params():
    return [pytest.param(name, backend, marks=[] if name in FAST_RUNTIME else [pytest.mark.slow],
                         id=f"{name}-{backend}") for name in EXACT for backend in ("ort", "cpp")]


@pytest.mark.parametrize("name, backend", _runtime_params())
def test_matches_lerobot_in_the_runtimes(sweep, name, backend):
    sweep.check_runtime(name, backend)


# ---- tests/peers_sweep/README.md's table is the manifest's ----------------------------------------------------

def test_readme_table_lists_every_fixture_with_its_outcome():
    rows = {}
    for line in (SWEEP / "README.md").read_text().splitlines():
        if line.startswith("| `") and f"{MARKER}:" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[-1].split(f"{MARKER}:")[1].strip(" `")] = cells[2]
    assert set(rows) == set(ENTRIES), set(rows) ^ set(ENTRIES)
    for name, outcome in rows.items():
        want = ENTRIES[name]["expected"]["outcome"]
        assert outcome.startswith("exact" if want == "exact" else "refused"), (name, outcome)


if __name__ == "__main__":  # .venv/bin/python tests/test_convert_lerobot033_sweep.py [fixture names]
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = _measure(Path(tempfile.mkdtemp(prefix="lerobot033_sweep_")), sys.argv[1:] or None, MANIFEST)
    (Path(tempfile.gettempdir()) / "lerobot033_sweep_measured.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows, MARKER))
