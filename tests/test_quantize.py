"""int8 bundles (`dpkit-export --precision int8`): manifest fields, both runtimes, the error bound.

    .venv/bin/pytest -q tests/test_quantize.py
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from dpkit.errors import DpkitError
from dpkit.export import quantize, writer
from dpkit.export.cli import main as export_main
from dpkit.runtime import load_policy
from dpkit.runtime.bundle import load_bundle
from dpkit.runtime.parity import random_observations, trajectory_errors


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_runs):
    out = tmp_path_factory.mktemp("int8") / "lowdim"
    summary = writer.export_bundle(tiny_runs["lowdim"], out, precision="int8", ddim_steps=(5, 10), log=lambda s: None)
    return out, summary


def test_int8_manifest_records_precision_quantization_and_error(int8_bundle):
    out, summary = int8_bundle
    m = load_bundle(out).manifest
    den, enc = m["models"]["denoiser"], m["models"]["encoder"]
    assert den["precision"] == "int8" and den["dtype"] == "float32" and enc["precision"] == "fp32"
    assert "quantization" not in enc and m["export"]["precision"] == "int8" and summary["precision"] == "int8"
    q = den["quantization"]
    assert q["method"] == "dynamic" and q["op_types"] == ["MatMul", "Gemm"] and q["per_channel"] is quantize.PER_CHANNEL
    graph = onnx.load(str(out / "denoiser.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert q["nodes_quantized"] == ops.count("MatMulInteger") > 0
    assert q["nodes_float"] == ops.count("MatMul") + ops.count("Gemm") > 0  # the layers kept float
    # The weights the float layers use stay float; the others are int8.
    init_types = {i.name: i.data_type for i in graph.graph.initializer}
    assert any(n.startswith(quantize.FLOAT_LAYERS) and t == onnx.TensorProto.FLOAT for n, t in init_types.items())
    assert sum(t == onnx.TensorProto.INT8 for t in init_types.values()) >= q["nodes_quantized"]
    # The error against the fp32 graphs: measured, recorded in the export block and the summary, within bounds.
    err = m["export"]["quantization_error"]
    assert err == summary["quantization_error"] and err["bounds"] == quantize.INT8_BOUNDS
    assert set(err["max"]) == {"encoder", "denoiser", "traj_ddim", "traj_ddpm"}
    assert err["max"]["encoder"] == 0.0  # the encoder graph ships unchanged
    for check in err["max"].keys() - {"encoder"}:  # a diffusion policy: no traj_fewstep (a student's check)
        assert 0 < err["max"][check] <= quantize.INT8_BOUNDS[check], (check, err["max"])  # visible, and bounded
    assert m["parity"] == err["max"] and m["parity_details"]["int8"]["max"] == err["max"]
    assert m["parity_details"]["fp32"]["max"]["denoiser"] < 1e-4  # the fp32 graphs were verified first


def test_int8_file_is_smaller_than_fp32(int8_bundle, tiny_bundles):
    out, _ = int8_bundle
    # int8 weights: a quarter of the bytes for the quantized layers; in this small test model the float
    # layers (step embedding, first and last) are a larger share than in `tiny` (26 %) or the 65.8 M model.
    assert (out / "denoiser.onnx").stat().st_size < 0.6 * (tiny_bundles["lowdim"] / "denoiser.onnx").stat().st_size


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 100)])
def test_int8_runs_in_ort_and_cpp_and_they_agree(int8_bundle, tiny_bundles, sampler, steps):
    out, _ = int8_bundle
    ort_p = load_policy(out, backend="ort")
    cpp_p = load_policy(out, backend="cpp")
    assert cpp_p.info["precision"] == "int8"
    assert load_policy(tiny_bundles["lowdim"], backend="cpp").info["precision"] == "fp32"
    obs = random_observations(ort_p.observations, ort_p.n_obs_steps, batch=2, seed=3)
    errs = trajectory_errors(ort_p, {"cpp": cpp_p}, obs, sampler, steps, seed=5)
    assert errs["cpp"] < 1e-4, errs  # the same int8 graphs in both runtimes
    # ... and they are not the fp32 graphs
    fp32 = load_policy(tiny_bundles["lowdim"], backend="ort")
    assert trajectory_errors(ort_p, {"fp32": fp32}, obs, sampler, steps, seed=5)["fp32"] > 1e-4


def test_bound_violation_refuses_to_write(tmp_path, tiny_runs, monkeypatch):
    monkeypatch.setattr(quantize, "INT8_BOUNDS", {"denoiser": 0.0, "traj_ddim": 0.0, "traj_ddpm": 0.0})
    out = tmp_path / "b"
    with pytest.raises(DpkitError, match=r"int8 error check failed: denoiser .* > bound 0; no bundle written"):
        writer.export_bundle(tiny_runs["lowdim"], out, precision="int8", ddim_steps=(10,), log=lambda s: None)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folders left either


@pytest.mark.parametrize("argv,expect", [
    (["--precision", "int4"], "--precision must be one of fp32, fp16, int8, got 'int4'"),
    (["--precision", "INT8"], "--precision must be one of fp32, fp16, int8, got 'INT8'"),
    (["--precision", "int8", "--fp16"], "--fp16 contradicts --precision int8"),
    (["--precision", "int8", "--tensorrt"], "--precision int8 is for CPUs"),
])
def test_cli_bad_precision_is_one_line(tmp_path, tiny_runs, capsys, argv, expect):
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as e:
        export_main([str(tiny_runs["lowdim"]), "--out", str(out), *argv])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err, err
    assert not out.exists()


def test_parse_precision():
    assert quantize.parse_precision(None) == "fp32"
    assert quantize.parse_precision(None, fp16=True) == "fp16"
    assert quantize.parse_precision("fp16", fp16=True) == "fp16"
    assert quantize.parse_precision("int8") == "int8"


def test_cli_writes_int8_and_its_json(tmp_path, tiny_runs):
    out, js = tmp_path / "b", tmp_path / "s.json"
    with pytest.raises(SystemExit) as e:
        export_main([str(tiny_runs["lowdim"]), "--out", str(out), "--precision", "int8", "--ddim-steps", "10",
                     "--json", str(js)])
    assert e.value.code == 0
    s = json.loads(js.read_text())
    assert s["precision"] == "int8" and set(s["quantization_error"]["max"]) >= set(quantize.INT8_BOUNDS) - {"traj_fewstep"}
    a = load_policy(out, backend="ort").sample(random_observations(load_bundle(out).observations, 2, 1), seed=0)
    assert np.isfinite(a).all()


def test_precision_benchmark_table_and_memory_limit():
    from dpkit.benchmarks.bench_precision import add_limits, markdown

    rows = [{"backend": "ort", "precision": p, "part": "denoiser", "batch": 1, "p50_ms": ms} for p, ms in
            (("fp32", 20.0), ("int8", 8.0))]
    rows += [{"backend": "cpp", "precision": p, "part": "chunk_ddim10", "batch": 1, "p50_ms": 10 * ms + 1,
              "denoiser_call_ms_from_chunk": ms} for p, ms in (("fp32", 16.0), ("int8", 5.0))]
    machine = {"date": "d", "cpu": "c", "cpu_features": [], "cores": 2, "threads": 2, "gemm_fp32_gflops": 1,
               "mem_gbps": 20.0, "load_avg_1m": 1, "onnxruntime": "x"}
    result = {"machine": machine, "configs": [{"config": "tiny", "params": 4e6, "rows": rows, "skipped": [],
                                               "denoiser_weight_bytes": {"fp32": 200e6, "int8": 50e6}}]}
    add_limits(result)
    assert rows[0]["memory_limit_ms"] == pytest.approx(10.0) and rows[0]["memory_share"] == pytest.approx(0.5)
    assert rows[1]["memory_share"] == pytest.approx(2.5 / 8.0)
    assert rows[2]["memory_share"] == pytest.approx(10.0 / 16.0)  # the C++ timer's denoiser share of a chunk
    md = markdown(result)
    assert "| ort | denoiser | 1 | 20.00 | 8.00 | 2.50× | 50 % | 31 % |" in md
    assert "| cpp | denoiser (C++ timer) | 1 | 16.00 | 5.00 | 3.20× | 62 % | 50 % |" in md


_RUN_GRAPH = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.save(sys.argv[3], s.run(None, feeds)[0])
"""


def test_int8_graph_computes_the_same_without_vnni(int8_bundle, tmp_path):
    """The int8 denoiser gives the same output on ONNX Runtime's AVX2 integer kernel as natively.

    valgrind's CPU exposes AVX2 but not AVX-512, so ORT picks its AVX2 u8 x s8 kernel there (VPMADDUBSW,
    saturating int16 pair sums) while a VNNI host runs VPDPBUSD. Full-range int8 weights overflow the
    AVX2 sums (this random-weight denoiser: 0.659 from fp32 under valgrind, 0.039 natively); 7-bit
    weights (quantize.REDUCE_RANGE) cannot, and both paths then compute the same integers, so the outputs
    agree to float rounding. 1e-3 is far below one int8 rounding step of this graph's output (~4e-2).
    """
    import shutil
    import subprocess
    import sys

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    out, _ = int8_bundle
    b = load_bundle(out)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((8, b.horizon, b.action_dim)).astype(np.float32),
             "timestep": rng.integers(0, 100, 8).astype(np.int64),
             "cond": rng.standard_normal((8, b.cond_dim)).astype(np.float32)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = tmp_path / "run.py"
    script.write_text(_RUN_GRAPH)
    outs = {}
    for name, prefix in (("native", []), ("avx2", ["valgrind", "--tool=none", "-q"])):
        subprocess.run([*prefix, sys.executable, str(script), str(out / "denoiser.onnx"), str(tmp_path / "feeds.npz"),
                        str(tmp_path / f"{name}.npy")], check=True, timeout=600)
        outs[name] = np.load(tmp_path / f"{name}.npy")
    assert np.abs(outs["native"] - outs["avx2"]).max() < 1e-3
