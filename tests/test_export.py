"""dpkit-export end to end on tiny checkpoints (low-dim and image), the bundle contract, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.export import cli, writer
from dpkit.export.tensorrt import TensorRTUnavailable, check_available
from dpkit.runtime import load_policy
from dpkit.io import sha256_file
from dpkit.runtime.bundle import load_bundle



@pytest.fixture(scope="module")
def runs(tiny_runs) -> dict[str, Path]:
    """conftest's random-weight `tiny` checkpoints (EMA weights differ from the raw ones, for --no-ema)."""
    return tiny_runs


@pytest.fixture(scope="module")
def bundles(tiny_bundles) -> dict[str, Path]:
    """conftest's exports of `runs` (read-only: copy before damaging)."""
    return tiny_bundles


def _obs(policy, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {o["name"]: (rng.uniform(0, 1, (batch, policy.n_obs_steps, *o["shape"])) * (1 if o["name"] == "image" else 500)).astype(np.float32)
            for o in policy.bundle.observations}


@pytest.mark.parametrize("mode", ["lowdim", "image"])
def test_bundle_contract_and_parity(bundles, runs, mode):
    b = load_bundle(bundles[mode])
    m = b.manifest
    assert sorted(p.name for p in bundles[mode].iterdir()) == ["denoiser.onnx", "encoder.onnx", "policy.json"]
    assert m["obs_mode"] == mode and m["first_action_index"] == m["n_obs_steps"] - 1
    assert [o["name"] for o in m["observations"]] == (["image", "agent_pos"] if mode == "image" else ["obs"])
    assert m["export"]["opset"] == 20 and m["export"]["ema"] is True and m["source"]["step"] == 5
    assert {s["name"] for s in m["scheduler"]["samplers"]} == {"ddpm-10", "ddpm-100", "ddim-2", "ddim-5", "ddim-10",
                                                              "ddim-100"}
    assert set(m["parity"]) == {"encoder", "denoiser", "traj_ddpm", "traj_ddim"}
    assert all(0 <= v < 1e-4 for v in m["parity"].values()), m["parity"]
    rows = m["parity_details"]["fp32"]["rows"]
    assert {(r["check"], r["inputs"], r["batch"]) for r in rows} >= {
        (g, i, n) for g in ("encoder", "denoiser") for i in ("dataset", "random") for n in (1, 8)}
    assert m["parity_details"]["inputs"].startswith("dataset")


@pytest.mark.parametrize("mode", ["lowdim", "image"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 5)])
def test_ort_backend_matches_torch_with_injected_noise(bundles, runs, mode, sampler, steps):
    ort_p = load_policy(bundles[mode], backend="ort")
    torch_p = load_policy(runs[mode], backend="torch")
    for attr in ("n_obs_steps", "horizon", "n_action_steps", "action_dim", "obs_mode", "obs_keys"):
        assert getattr(ort_p, attr) == getattr(torch_p, attr), attr
    obs = _obs(ort_p, batch=3)  # a batch size the export never saw: the batch axis is dynamic
    kw = dict(sampler=sampler, steps=steps, seed=7)
    a, b = ort_p.sample(obs, **kw), torch_p.sample(obs, **kw)
    assert a.shape == (3, ort_p.horizon, ort_p.action_dim)
    assert np.abs(a - b).max() < 1e-4
    # Different noise gives a different trajectory (the comparison above is not vacuous).
    assert np.abs(ort_p.sample(obs, sampler=sampler, steps=steps, seed=8) - a).max() > 1e-3
    acts_o, acts_t = ort_p.predict_action(obs, **kw), torch_p.predict_action(obs, **kw)
    assert acts_o.shape == (3, ort_p.n_action_steps, 2)
    assert np.abs(acts_o - acts_t).max() < 1e-2  # environment units (pixels)


def test_fp16_bundle_reports_its_own_parity(tmp_path, runs, bundles):
    out = tmp_path / "half"
    summary = writer.export_bundle(runs["lowdim"], out, fp16=True, ddim_steps=(10,), log=lambda s: None)
    m = load_bundle(out).manifest
    assert m["export"]["fp16"] is True and m["models"]["denoiser"]["dtype"] == "float16"
    assert set(m["parity_details"]) >= {"fp32", "fp16"}
    assert m["parity"] == m["parity_details"]["fp16"]["max"] == summary["parity"]
    assert 1e-6 < m["parity"]["denoiser"] < 5e-2  # fp16 rounding is visible, and bounded
    # fp16 weights: the denoiser file is about half the size of the fp32 one.
    assert (out / "denoiser.onnx").stat().st_size < 0.8 * (bundles["lowdim"] / "denoiser.onnx").stat().st_size


def test_sha256_mismatch_and_format_version_are_refused(tmp_path, bundles):
    bad = tmp_path / "b"
    shutil.copytree(bundles["lowdim"], bad)
    load_policy(bad, backend="ort")  # intact copy loads
    data = bytearray((bad / "denoiser.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(DpkitError, match="sha256"):
        load_policy(bad, backend="ort")

    shutil.rmtree(bad)
    shutil.copytree(bundles["lowdim"], bad)
    m = json.loads((bad / "policy.json").read_text())
    m["format_version"] = 2
    (bad / "policy.json").write_text(json.dumps(m))
    with pytest.raises(DpkitError, match="format_version is 2"):
        load_policy(bad, backend="ort")
    with pytest.raises(DpkitError, match="does not exist"):
        load_policy(tmp_path / "nope", backend="ort")


def test_runtime_input_errors(bundles):
    p = load_policy(bundles["image"], backend="ort")
    obs = _obs(p, 2)
    with pytest.raises(DpkitError, match="missing"):
        p.sample({"image": obs["image"]})
    with pytest.raises(DpkitError, match="no sampler ddim with steps=7"):
        p.sample(obs, sampler="ddim", steps=7)
    with pytest.raises(DpkitError, match="initial_noise has shape"):
        p.sample(obs, initial_noise=np.zeros((1, 16, 2), np.float32))
    with pytest.raises(DpkitError, match="unknown backend"):
        load_policy(bundles["image"], backend="tensorflow")


def _cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_bad_input(tmp_path, runs, bundles, capsys):
    code, err = _cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "does not exist" in err and not (tmp_path / "o").exists()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs["lowdim"], corrupt)
    ckpt = next((corrupt / "checkpoints").glob("step_*"))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    code, err = _cli([str(corrupt), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "corrupt" in err and not (tmp_path / "o").exists()

    before = sha256_file(bundles["lowdim"] / "policy.json")
    code, err = _cli([str(runs["lowdim"]), "--out", str(bundles["lowdim"])], capsys)
    assert code == 1 and "--force" in err and sha256_file(bundles["lowdim"] / "policy.json") == before
    # --force with --out naming the training run (not a bundle) is refused; the run stays.
    n_files = len(list(runs["lowdim"].rglob("*")))
    code, err = _cli([str(runs["lowdim"]), "--out", str(runs["lowdim"]), "--force"], capsys)
    assert code == 1 and "is not a bundle folder" in err and len(list(runs["lowdim"].rglob("*"))) == n_files

    code, err = _cli([str(runs["lowdim"]), "--out", str(tmp_path / "o"), "--opset", "9"], capsys)
    assert code == 1 and "--opset" in err
    code, err = _cli([str(runs["lowdim"]), "--out", str(tmp_path / "o"), "--ddim-steps", "ten"], capsys)
    assert code == 1 and "--ddim-steps" in err
    code, err = _cli([str(runs["lowdim"]), "--out", str(tmp_path / "o"), "--ddim-steps", "500"], capsys)
    assert code == 1 and "outside [1, 100]" in err
    assert not (tmp_path / "o").exists()
    code, _ = _cli([str(runs["lowdim"]), "--out", str(tmp_path / "o"), "--max-batch", "zero"], capsys)
    assert code == 2  # argparse usage error
    assert not list(tmp_path.glob(".o.*"))  # no temp folders left behind


def test_failed_parity_leaves_no_bundle(tmp_path, runs, bundles, monkeypatch):
    import dpkit.export.verify as verify

    def copy_graphs(policy, out_dir, opset, fp16=False, gemm_conv=True):  # skip the slow exporter: reuse good graphs
        return {g: Path(shutil.copy(bundles["lowdim"] / f"{g}.onnx", out_dir)) for g in ("encoder", "denoiser")}

    monkeypatch.setattr(writer, "export_policy", copy_graphs)
    monkeypatch.setattr(verify, "FP32_TOLERANCE", 0.0)  # any rounding difference now fails
    out = tmp_path / "b"
    with pytest.raises(DpkitError, match="parity check failed"):
        writer.export_bundle(runs["lowdim"], out, ddim_steps=(10,), log=lambda s: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_no_ema_and_missing_tensorrt(tmp_path, runs, bundles, capsys):
    """--no-ema exports other weights; --tensorrt without GPU/TensorRT exits 2 and keeps a valid bundle."""
    try:
        check_available()
        trt_missing = False
    except TensorRTUnavailable:
        trt_missing = True
    out, summary = tmp_path / "raw", tmp_path / "s.json"
    code, err = _cli([str(runs["lowdim"]), "--out", str(out), "--no-ema", "--tensorrt", "--ddim-steps", "10",
                      "--json", str(summary)], capsys)
    if trt_missing:
        assert code == 2 and "missing" in err and "NVIDIA GPU" in err
    else:
        assert code == 0 and (out / "trt_cache").is_dir()
    raw, ema = load_bundle(out), load_bundle(bundles["lowdim"])  # still a valid bundle
    assert raw.manifest["export"]["ema"] is False
    assert raw.manifest["models"]["denoiser"]["sha256"] != ema.manifest["models"]["denoiser"]["sha256"]
    assert json.loads(summary.read_text())["parity"]["denoiser"] < 1e-4


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Conv1d(6, 10, 5, padding=2),
    lambda: torch.nn.Conv1d(6, 10, 3, stride=2, padding=1),
    lambda: torch.nn.Conv1d(6, 10, 3, stride=2, bias=False),
    lambda: torch.nn.Conv1d(6, 10, 1),
    lambda: torch.nn.ConvTranspose1d(6, 10, 4, stride=2, padding=1),
    lambda: torch.nn.ConvTranspose1d(6, 10, 3, stride=1, padding=1, bias=False),
], ids=["k5", "k3s2", "k3s2-nobias-nopad", "k1", "T-k4s2", "T-k3s1"])
def test_gemm_conv_matches_torch(make):
    """The export-time GEMM stand-ins compute what nn.Conv1d / nn.ConvTranspose1d compute."""
    from dpkit.export.fast_conv import batch_gemm_convs

    torch.manual_seed(0)
    conv = make()
    gemm = batch_gemm_convs(torch.nn.Sequential(conv))[0]
    assert type(gemm) is not type(conv)
    for batch, length in ((1, 7), (3, 16), (5, 4)):
        x = torch.randn(batch, 6, length)
        want, got = conv(x), gemm(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exported_denoiser_has_no_conv(bundles):
    """The default export writes the denoiser's convolutions as batch-wide MatMuls (see fast_conv.py)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundles["lowdim"] / "denoiser.onnx")).graph.node}
    assert not ops & {"Conv", "ConvTranspose"} and ops & {"MatMul", "Gemm"}, sorted(ops)


def test_plain_conv_option_keeps_conv_nodes(tmp_path, runs):
    import onnx

    out = tmp_path / "plain"
    with pytest.raises(SystemExit) as e:
        cli.main([str(runs["lowdim"]), "--out", str(out), "--plain-conv", "--ddim-steps", "10"])
    assert e.value.code == 0
    ops = {n.op_type for n in onnx.load(str(out / "denoiser.onnx")).graph.node}
    assert {"Conv", "ConvTranspose"} <= ops, sorted(ops)
    assert json.loads((out / "policy.json").read_text())["export"]["conv_lowering"] == "conv"
    assert load_bundle(out).manifest["parity"]["denoiser"] < 1e-4


def test_failed_engine_build_leaves_no_partial_cache(tmp_path, bundles, monkeypatch):
    """A TensorRT/ORT error mid-build is one clear line, and neither a partial trt_cache/ nor a changed bundle."""
    import dpkit.export.tensorrt as trt

    b = tmp_path / "b"
    shutil.copytree(bundles["lowdim"], b)
    built = []

    def fake_build(onnx_path, cache, inputs, profile):
        built.append(onnx_path.name)
        (cache / f"{onnx_path.stem}.engine").write_bytes(b"engine")
        if onnx_path.name == "denoiser.onnx":
            raise RuntimeError("[TensorRT EP] out of workspace memory\nlong native trace")

    monkeypatch.setattr(trt, "check_available", lambda: None)
    monkeypatch.setattr(trt, "_build_with_ort", fake_build)
    manifest = json.loads((b / "policy.json").read_text())
    with pytest.raises(DpkitError, match=r"^TensorRT engine build for denoiser.onnx failed: \[TensorRT EP\] out of "
                                         r"workspace memory$"):
        trt.build_engines(b, manifest)
    assert built == ["encoder.onnx", "denoiser.onnx"]
    assert sorted(p.name for p in b.iterdir()) == ["denoiser.onnx", "encoder.onnx", "policy.json"]
    monkeypatch.setattr(trt, "_build_with_ort", lambda o, c, i, p: (c / f"{o.stem}.engine").write_bytes(b"e"))
    entry = trt.build_engines(b, manifest)
    assert entry == {**manifest["tensorrt"], "engines": True}
    assert sorted(p.name for p in (b / "trt_cache").iterdir()) == ["denoiser.engine", "encoder.engine"]


def test_ort_backend_reuses_exported_engines_options(bundles):
    """A bare "TensorrtExecutionProvider" gets the manifest's cache folder, precision and batch profile."""
    pol = load_policy(bundles["lowdim"], backend="ort", threads=1)
    (name, opts), cuda = pol._providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], "denoiser")
    assert (name, cuda) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert pol.bundle.manifest["tensorrt"] == {"cache_dir": "trt_cache", "min_batch": 1, "opt_batch": 8,
                                               "max_batch": 64, "precision": "fp32", "engines": False}
    assert opts["trt_engine_cache_path"] == str(bundles["lowdim"] / "trt_cache") and opts["trt_fp16_enable"] is False
    assert opts["trt_profile_max_shapes"].startswith("sample:64x16x2,")
    pol.bundle.manifest["tensorrt"] = {"cache_dir": "trt_cache", "min_batch": 1, "opt_batch": 8, "max_batch": 16,
                                       "precision": "fp16", "engines": True}
    (_, opts), _ = pol._providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], "denoiser")
    c = pol.bundle.cond_dim
    assert opts["trt_fp16_enable"] is True
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        f"sample:1x16x2,timestep:1,cond:1x{c}", f"sample:8x16x2,timestep:8,cond:8x{c}",
        f"sample:16x16x2,timestep:16,cond:16x{c}")
    (_, enc), = pol._providers(["TensorrtExecutionProvider"], "encoder")
    assert enc["trt_profile_max_shapes"] == "obs:16x2x20"
    assert pol._providers(["CPUExecutionProvider"], "encoder") == ["CPUExecutionProvider"]
