"""dpkit-bench: a tiny end-to-end run writes a complete report; statistics, overhead and option errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpkit.errors import DpkitError
from dpkit.benchmarks import latency as bench

REQUIRED_ROW_KEYS = {"backend", "model", "batch", "steps", "sampler", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                     "peak_share", "gflops", "n", "kind"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One small run over every CPU backend (exports the tiny bundle once: most of this file's time)."""
    import torch

    root = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    argv = ["--models", "tiny", "--backends", "torch", "ort", "cpp", "ort-cuda", "--batch", "1", "2",
            "--samplers", "ddim-2", "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-progress",
            "--out-dir", str(root / "results"), "--cache-dir", str(root / "cache"), "--json", str(root / "extra.json")]
    try:
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 0
    return root


def test_smoke_run_writes_json_markdown_and_png(smoke):
    result = json.loads((smoke / "results" / "latency.json").read_text())
    assert json.loads((smoke / "extra.json").read_text())["rows"] == result["rows"]
    m = result["machine"]
    for key in ("gemm_fp32_gflops", "mem_gbps", "cpu", "cores", "torch", "onnxruntime", "date", "threads"):
        assert key in m, key
    assert m["gemm_fp32_gflops"] > 1 and m["mem_gbps"] > 0.1 and m["threads"] == 1
    assert result["quick"] is False and result["settings"]["samplers"] == ["ddim-2"]

    rows = result["rows"]
    for r in rows:
        assert REQUIRED_ROW_KEYS <= set(r), REQUIRED_ROW_KEYS - set(r)
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    chunks = {(r["backend"], r["batch"]) for r in rows if r["kind"] == "chunk"}
    assert {("torch", 1), ("torch", 2), ("ort", 1), ("ort", 2)} <= chunks
    for r in rows:
        if r["kind"] == "chunk":
            assert (r["sampler"], r["steps"]) == ("ddim", 2)
            # FLOPs = batch * (encoder + K * denoiser), so GFLOP/s and the peak share follow from p50.
            tiny = result["models"]["tiny"]
            flops = r["batch"] * (tiny["encoder_mflop"] + 2 * tiny["denoiser_mflop"]) * 1e6
            assert r["gflops"] == pytest.approx(flops / (r["p50_ms"] / 1e3) / 1e9, rel=1e-2)
            assert r["peak_share"] == pytest.approx(r["gflops"] / m["gemm_fp32_gflops"], rel=1e-2)
            if r["backend"] in ("torch", "ort", "cpp"):  # cpp: from the ort parts of the same bundle
                assert isinstance(r["overhead_us_per_step"], float)
                assert r["overhead_parts_from"] == ("internal" if r["backend"] == "cpp" else r["backend"])
                if r["backend"] == "cpp":  # the C++ runtime's own timer: time outside the networks, never < 0
                    assert 0 <= r["overhead_us_per_step"] < r["p50_ms"] * 1e3 / r["steps"]
    # A missing backend is recorded with its reason, never a crash.
    backends_seen = {r["backend"] for r in rows} | {s["backend"] for s in result["skipped"]}
    assert {"cpp", "ort-cuda"} <= backends_seen
    for s in result["skipped"]:
        assert s["reason"]

    md = (smoke / "results" / "latency.md").read_text()
    assert "| tiny | ort | 1 | ddim | 2 |" in md and "| tiny | torch | 2 | ddim | 2 |" in md
    png = (smoke / "results" / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Atomic writes leave no temp files behind.
    assert not [p for p in (smoke / "results").iterdir() if p.name.startswith(".")]


def test_latency_stats_percentiles():
    st = bench.latency_stats(np.arange(1, 101) / 1e3)  # 1..100 ms
    assert st["p50_ms"] == pytest.approx(50.5)
    assert st["p90_ms"] == pytest.approx(90.1)
    assert st["p99_ms"] == pytest.approx(99.01)
    assert st["mean_ms"] == pytest.approx(50.5) and st["n"] == 100
    assert bench.latency_stats([0.002])["p99_ms"] == pytest.approx(2.0)
    with pytest.raises(DpkitError):
        bench.latency_stats([])


def test_time_calls_stops_at_budget_but_keeps_min_repeats():
    calls = []
    times = bench.time_calls(lambda: calls.append(1), repeats=1000, warmup=3, budget_s=0.0, min_repeats=4)
    assert len(times) == 4 and len(calls) == 7


def test_overhead_is_chunk_minus_parts_unless_measured_inside():
    def row(backend, kind, p50, steps=10, **kw):
        return {"backend": backend, "model": "m", "batch": 1, "kind": kind, "p50_ms": p50, "steps": steps, **kw}

    rows = [row("ort", "encoder", 1.0), row("ort", "denoiser", 2.0), row("ort", "chunk", 1.0 + 10 * 2.05),
            row("cpp", "chunk", 1.0 + 10 * 2.01, overhead_us_per_step=3.5, overhead_parts_from="internal"),
            row("torch", "chunk", 30.0)]
    bench.add_overheads(rows)
    assert rows[2]["overhead_us_per_step"] == pytest.approx(50.0)
    assert rows[3]["overhead_us_per_step"] == 3.5 and rows[3]["overhead_parts_from"] == "internal"  # kept
    assert rows[4]["overhead_us_per_step"] is None  # no torch parts measured


@pytest.mark.parametrize("args, message", [
    (["--backends", "tensorflow"], "unknown backend 'tensorflow'"),
    (["--models", "resnet"], "unknown model 'resnet'"),
    (["--samplers", "ddim"], "--samplers entry 'ddim'"),
    (["--samplers", "euler-10"], "--samplers entry 'euler-10'"),
    (["--batch", "0"], "--batch values must be >= 1"),
    (["--batch", "x"], "--batch expects integers"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--samplers", "fewstep-3"], "the bench's few-step student has 2 timesteps"),
    (["--precision", "fp16"], "unknown precision 'fp16'"),
])
def test_bad_options_exit_nonzero_with_one_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(args + ["--out-dir", str(tmp_path)])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_sampler_no_backend_could_run_is_an_error(smoke, capsys, tmp_path):
    """`--samplers ddim-7` with bundle backends only: the bundle lists no ddim-7, so nothing is measured."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "tiny", "--backends", "ort", "--batch", "1", "--samplers", "ddim-7", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--no-progress", "--out-dir", str(tmp_path / "out"),
                    "--cache-dir", str(smoke / "cache")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was measured for ddim-7" in err[0] and "ddim-7" in err[0]
    assert not (tmp_path / "out").exists()


def test_fewstep_rows_beside_the_teachers(smoke, tmp_path):
    """--fewstep: the same tiny network as a few-step student (exported beside the smoke run's cached teacher)
    gives fewstep-1/-2 rows next to the teacher's ddim-2 for each backend; C++ counts one denoiser call."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--models", "tiny", "--backends", "cpp", "ort", "--batch", "1", "--samplers", "ddim-2",
                        "--fewstep", "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-progress",
                        "--out-dir", str(out), "--cache-dir", str(smoke / "cache")])
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 0
    result = json.loads((out / "latency.json").read_text())
    assert result["settings"]["samplers"] == ["ddim-2", "fewstep-1", "fewstep-2"]
    assert result["settings"]["precisions"] == ["fp32"]
    assert result["models"]["tiny"]["fewstep_student"]["fewstep_timesteps"] == [99, 49]
    chunks = {(r["backend"], r["sampler"], r["steps"]): r for r in result["rows"] if r["kind"] == "chunk"}
    ran = {b for b, _, _ in chunks}
    assert "ort" in ran  # cpp too when the C++ module is built; else it is skipped with its reason
    assert "cpp" in ran or any(s["backend"] == "cpp" for s in result["skipped"])
    for b in ran:
        teacher, one, two = chunks[(b, "ddim", 2)], chunks[(b, "fewstep", 1)], chunks[(b, "fewstep", 2)]
        assert not teacher["student"] and one["student"] and two["student"]
        assert one["precision"] == two["precision"] == teacher["precision"] == "fp32"
        assert 0 < one["p50_ms"] and 0 < two["p50_ms"]
        assert one["model"] == two["model"] == teacher["model"] == "tiny"
    if "cpp" in ran:  # the C++ runtime counts its own denoiser runs
        assert chunks[("cpp", "fewstep", 1)]["denoiser_calls"] == 1
        assert chunks[("cpp", "fewstep", 2)]["denoiser_calls"] == 2
        assert chunks[("cpp", "ddim", 2)]["denoiser_calls"] == 2
    md = (out / "latency.md").read_text()
    assert "| tiny | ort | 1 | fewstep | 1 |" in md and "| tiny | ort | 1 | ddim | 2 |" in md
    assert "Few-step student rows against the teacher's ddim-10" in md
    assert "| tiny | ort | fp32 | 1 | fewstep-1 |" in md


def test_fewstep_and_precision_settings():
    parse = bench.build_parser().parse_args
    s = bench.settings_from_args(parse(["--samplers", "ddim-10", "--fewstep", "--precision", "fp32", "int8"]))
    assert s.samplers == (("ddim", 10), ("fewstep", 1), ("fewstep", 2)) and s.precisions == ("fp32", "int8")
    s = bench.settings_from_args(parse(["--samplers", "fewstep-1", "ddim-10"]))
    assert s.samplers == (("fewstep", 1), ("ddim", 10)) and s.precisions == ("fp32",)


def test_unwritable_out_dir_fails_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "tiny", "--out-dir", str(blocker / "results")])
    assert exc.value.code != 0
    assert "error:" in capsys.readouterr().err


def test_quick_settings_are_recorded():
    s = bench.settings_from_args(bench.build_parser().parse_args(["--quick", "--threads", "1"]))
    assert s.quick and s.models == ("tiny", "pusht_lowdim") and s.threads == 1 and max(s.batches) > 1


def test_report_writers_on_a_synthetic_result(tmp_path):
    machine = {"cpu": "test cpu", "cores": 2, "threads": 2, "gemm_fp32_gflops": 100.0, "mem_gbps": 10.0,
               "torch": "x", "onnxruntime": "y", "date": "today"}
    rows = [{"backend": b, "provider": "cpu", "model": "tiny", "kind": "chunk", "batch": bt, "sampler": s, "steps": k,
             "p50_ms": p, "p90_ms": p * 1.1, "p99_ms": p * 1.3, "mean_ms": p, "min_ms": p, "max_ms": p * 1.3, "n": 5,
             "gflops": 1.0, "peak_share": 0.01, "overhead_us_per_step": 3.0}
            for b, p in (("torch", 50.0), ("cpp", 10.0)) for bt in (1, 8) for s, k in (("ddpm", 100), ("ddim", 10))]
    result = {"quick": True, "machine": machine, "rows": rows, "skipped": [{"backend": "ort-cuda", "reason": "no GPU"}],
              "models": {"tiny": {"params": 4e6, "encoder_mflop": 0.0, "denoiser_mflop": 37.0}}, "elapsed_s": 1.0}
    paths = bench.write_results(result, tmp_path)
    assert sorted(p.name for p in paths.values()) == ["latency_quick.json", "latency_quick.md", "latency_quick.png"]
    md = paths["md"].read_text()
    assert md.count("| tiny |") == 8 and "ort-cuda: no GPU" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_gpu_parity_checks_the_torch_path_against_the_bundle(smoke, tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_parity on the CPU (the same check the GPU run makes): torch and the bundle's reference
    runtime sample the same trajectories from the same seed, for the model and its few-step student; without a
    GPU, --device cuda is one clear error."""
    import torch

    from dpkit.benchmarks import gpu_parity

    monkeypatch.setenv("DPKIT_THREADS", "1")  # --threads sets it; monkeypatch puts it back
    threads = torch.get_num_threads()
    out = tmp_path / "parity.json"
    try:
        with pytest.raises(SystemExit) as exc:
            gpu_parity.main(["--device", "cpu", "--models", "tiny", "--samplers", "ddim-2", "fewstep-1",
                             "--batch", "2", "--threads", "1", "--cache-dir", str(smoke / "cache"), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert exc.value.code == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["device"] == "cpu"
    assert [(r["sampler"], r["student"]) for r in result["rows"]] == [("ddim-2", False), ("fewstep-1", True)]
    for r in result["rows"]:
        assert 0 <= r["max_abs_device_vs_reference"] <= 1e-4 and r["max_abs_device_vs_cpu"] == 0.0
    assert "2/2 rows within" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            gpu_parity.main(["--models", "tiny", "--cache-dir", str(smoke / "cache")])
        assert exc.value.code != 0
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err
