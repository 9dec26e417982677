"""The bundle contract: the table of damaged bundles, the golden bundle, and the reader's helpers.

    .venv/bin/pytest -q tests/test_bundle_contract.py

There is one bundle reader (cpp/src/manifest.cpp); cpp/tests/test_manifest.cpp runs the table of damaged
bundles (cpp/tests/data/damaged_bundles.json) against it in C++, and this file runs it through Python's
entry point (dpkit.runtime.bundle.load_bundle, under load_policy(..., backend="ort")): each case must be
refused with one line containing its `expect` text. The bases are the committed golden bundles
(tests/data/golden/make_golden.py), so no export runs here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.runtime import load_policy
from dpkit.io import MAX_JSON_DEPTH, json_depth
from dpkit.runtime.bundle import check_graph_io, limits, load_bundle, onnx_info, ort_trt_options

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "cpp" / "tests" / "data" / "damaged_bundles.json"
GOLDEN = ROOT / "tests" / "data" / "golden"
CASES = json.loads(TABLE.read_text())["cases"]


# --------------------------------------------------------------------------- the shared table


def _pointer(j, pointer: str):
    """(parent container, last key) of a JSON pointer (RFC 6901)."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    parent = j
    for t in tokens[:-1]:
        parent = parent[int(t)] if isinstance(parent, list) else parent[t]
    last = tokens[-1]
    return parent, (int(last) if isinstance(parent, list) else last)


def apply_edits(bundle: Path, edits: list[dict]) -> None:
    """The table's edits (see its `about`), in order; policy.json is written once at the end."""
    j = json.loads((bundle / "policy.json").read_text())
    text_ops: list[tuple[str, str] | str] = []  # (old, new) replacements or a whole text, after the JSON edits
    for e in edits:
        if "set" in e:
            parent, key = _pointer(j, e["set"])
            parent[key] = e["value"]
        elif "delete" in e:
            parent, key = _pointer(j, e["delete"])
            del parent[key]
        elif "nest" in e:
            parent, key = _pointer(j, e["nest"])
            parent[key] = "__NEST__"
            text_ops.append(('"__NEST__"', "[" * e["depth"] + "]" * e["depth"]))
        elif "replace" in e:
            text_ops.append(tuple(e["replace"]))
        elif "write_file" in e:  # before "text": this edit has a `text` too
            (bundle / e["write_file"]).write_text(e["text"])
        elif "text" in e:
            text_ops.append(e["text"])
        elif "delete_file" in e:
            (bundle / e["delete_file"]).unlink()
        elif "flip_byte" in e:
            data = bytearray((bundle / e["flip_byte"]).read_bytes())
            data[e["offset"]] ^= 0xFF
            (bundle / e["flip_byte"]).write_bytes(bytes(data))
        elif "mkdir" in e:
            (bundle / e["mkdir"]).mkdir()
        elif "move_outside" in e:
            outside = bundle.parent / f"{bundle.name}_outside"
            outside.mkdir(exist_ok=True)
            target = outside / e["move_outside"]
            shutil.move(str(bundle / e["move_outside"]), target)
            (bundle / e["move_outside"]).symlink_to(target.resolve())
        else:
            raise AssertionError(f"unknown edit {e}")
    text = json.dumps(j)
    for op in text_ops:
        text = op if isinstance(op, str) else text.replace(op[0], op[1])
    (bundle / "policy.json").write_text(text)


def test_table_is_well_formed():
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 30
    bases = json.loads(TABLE.read_text())["bases"]
    assert all(c.get("base", "bundle") in bases and c["expect"] and c["edits"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_damaged_bundle_is_refused(case, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(GOLDEN / case.get("base", "bundle"), bundle)
    load_bundle(bundle)  # the intact copy is valid: the refusal below is the edit's doing
    apply_edits(bundle, case["edits"])
    with pytest.raises(DpkitError) as e:
        load_policy(bundle, backend="ort")
    msg = str(e.value)
    assert case["expect"] in msg, msg
    assert "\n" not in msg and msg.startswith(str(bundle / "policy.json") + ": ")


# --------------------------------------------------------------------------- the golden bundle


def _backends() -> list[str]:
    try:
        import dpkit.runtime._core  # noqa: F401
    except ImportError:
        return ["ort"]
    return ["ort", "cpp"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("base", ["bundle", "bundle_external"])
def test_golden_bundle_reproduces_saved_outputs(backend, base):
    """Today's backends run the committed bundle and reproduce what PyTorch returned when it was made."""
    ref = np.load(GOLDEN / "reference.npz")
    policy = load_policy(GOLDEN / base, backend=backend)
    scale = np.abs(np.asarray(load_bundle(GOLDEN / base).manifest["action_normalizer"]["scale"])).max()
    for sampler, steps in (("ddim", 10), ("ddpm", 100)):
        kw = dict(sampler=sampler, steps=steps, initial_noise=ref["initial_noise"], step_noise=ref["step_noise"][:steps])
        traj = policy.sample({"obs": ref["obs"]}, **kw)
        np.testing.assert_allclose(traj, ref[f"traj_{sampler}_{steps}"], rtol=0, atol=1e-4)
        actions = policy.predict_action({"obs": ref["obs"]}, **kw)
        np.testing.assert_allclose(actions, ref[f"actions_{sampler}_{steps}"], rtol=0, atol=1e-4 * scale)
    # The comparison is not vacuous: other noise gives another trajectory.
    other = policy.sample({"obs": ref["obs"]}, sampler="ddim", steps=10, initial_noise=ref["initial_noise"][::-1].copy())
    assert np.abs(other - ref["traj_ddim_10"]).max() > 1e-2


@pytest.mark.parametrize("backend", _backends())
def test_bundle_without_prediction_type_is_epsilon(backend, tmp_path):
    """A scheduler without `prediction_type` (optional since "sample" exists) samples as "epsilon" did."""
    ref = np.load(GOLDEN / "reference.npz")
    bundle = tmp_path / "b"
    shutil.copytree(GOLDEN / "bundle", bundle)
    apply_edits(bundle, [{"delete": "/scheduler/prediction_type"}])
    assert load_bundle(bundle).schedule.prediction_type == "epsilon"
    traj = load_policy(bundle, backend=backend).sample({"obs": ref["obs"]}, sampler="ddim", steps=10,
                                                       initial_noise=ref["initial_noise"])
    np.testing.assert_allclose(traj, ref["traj_ddim_10"], rtol=0, atol=1e-4)


def test_golden_manifest_layout():
    """What the golden bundles record: listed-and-hashed external data, the TensorRT profile, samplers."""
    plain, ext = load_bundle(GOLDEN / "bundle").manifest, load_bundle(GOLDEN / "bundle_external").manifest
    assert "external_data" not in plain["models"]["denoiser"]
    assert [e["file"] for e in ext["models"]["denoiser"]["external_data"]] == ["denoiser.onnx.data"]
    assert plain["tensorrt"] == {"cache_dir": "trt_cache", "min_batch": 1, "opt_batch": 8, "max_batch": 64,
                                 "precision": "fp32", "engines": False}
    assert [s["name"] for s in plain["scheduler"]["samplers"]] == ["ddpm-100", "ddpm-10", "ddim-10", "ddim-100"]


# --------------------------------------------------------------------------- reader helpers


def test_onnx_info_matches_the_onnx_package():
    onnx = pytest.importorskip("onnx")
    for path in (GOLDEN / "bundle" / "encoder.onnx", GOLDEN / "bundle_external" / "denoiser.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        info = onnx_info(path)
        inits = {t.name for t in model.graph.initializer}
        want = [(i.name, i.type.tensor_type.elem_type,
                 tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim))
                for i in model.graph.input if i.name not in inits]
        assert info["inputs"] == want
        ext = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert info["external"] == ext


def test_check_graph_io_takes_what_ort_reports():
    """The function a backend calls on its sessions: the contract's names, types and fixed sizes."""
    import onnxruntime as ort

    b = load_bundle(GOLDEN / "bundle")
    sessions = {g: ort.InferenceSession(str(b.graph_files[g]), providers=["CPUExecutionProvider"]) for g in ("encoder", "denoiser")}
    for g, s in sessions.items():
        check_graph_io(b, g, s.get_inputs(), s.get_outputs())
    b.manifest["cond_dim"] = 41
    with pytest.raises(DpkitError, match=r"output 'cond' has shape \(B, 40\), expected \(B, 41\)"):
        check_graph_io(b, "encoder", sessions["encoder"].get_inputs(), sessions["encoder"].get_outputs())
    with pytest.raises(DpkitError, match=r"input 'cond' has shape \(B, 40\), expected \(B, 41\)"):
        check_graph_io(b, "denoiser", sessions["denoiser"].get_inputs(), sessions["denoiser"].get_outputs())


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth('{"a": [[1]], "b": "[[[[", "c": "\\"[["}') == 3
    assert json_depth("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1
    assert limits()["max_json_depth"] == MAX_JSON_DEPTH  # the bundle reader's bound is dpkit's one JSON bound


def test_view_is_the_document_the_reader_checked():
    """load_bundle builds its view from the JSON the C++ reader validated: the file's values and key order."""
    for base in ("bundle", "bundle_external"):
        assert load_bundle(GOLDEN / base).manifest == json.loads((GOLDEN / base / "policy.json").read_text())
    m = load_bundle(GOLDEN / "bundle").manifest
    assert list(m) == list(json.loads((GOLDEN / "bundle" / "policy.json").read_text()))


def test_without_the_compiled_reader_load_bundle_says_how_to_build(monkeypatch):
    import sys

    import dpkit.runtime

    monkeypatch.setitem(sys.modules, "dpkit.runtime._core", None)
    monkeypatch.delattr(dpkit.runtime, "_core", raising=False)
    with pytest.raises(DpkitError) as e:
        load_bundle(GOLDEN / "bundle")
    msg = str(e.value)
    assert "dpkit.runtime._core" in msg and "pip install ." in msg and "make install" in msg and "\n" not in msg


def test_trt_options_come_from_the_manifest_profile(tmp_path):
    inputs = {"sample": (16, 2), "timestep": (), "cond": (40,)}
    trt = {"cache_dir": "trt_cache", "min_batch": 2, "opt_batch": 4, "max_batch": 32, "precision": "fp16", "engines": True}
    opts = ort_trt_options(tmp_path, inputs, trt)
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        "sample:2x16x2,timestep:2,cond:2x40", "sample:4x16x2,timestep:4,cond:4x40", "sample:32x16x2,timestep:32,cond:32x40")
    assert ort_trt_options(tmp_path, inputs, None) == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path)}
