"""A bundle's precision is what its graphs are, not what policy.json says (issue 21, docs/bundle-format.md
"Precision"): the bundle reader (cpp/src/manifest.cpp; in Python through dpkit.runtime.bundle) derives fp32 /
fp16 / int8 from each graph's nodes and tensors and refuses a label that disagrees. The damaged-bundle table
(cpp/tests/data/damaged_bundles.json) holds the cases its fp32 golden bundles can express; the ones that need
an int8 graph are built here from an int8 export of the tiny test model. The wording of the evidence for
given counts is tested in C++ (cpp/tests/test_manifest.cpp, Manifest.OnnxInfo).

    .venv/bin/python -m pytest tests/test_bundle_precision.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpkit.errors import DpkitError
from dpkit.export import writer
from dpkit.io import sha256_file
from dpkit.runtime import load_policy
from dpkit.runtime.bundle import load_bundle, onnx_info


def _backends() -> list[str]:
    try:
        import dpkit.runtime._core  # noqa: F401
    except ImportError:
        return ["ort"]
    return ["ort", "cpp"]


BACKENDS = _backends()
GOLDEN = Path(__file__).parent / "data" / "golden" / "bundle"
FP32_EVIDENCE = "no integer quantization nodes, no int8/uint8 or float16 tensors"
FP32 = f"is fp32 ({FP32_EVIDENCE})"


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_runs) -> Path:
    out = tmp_path_factory.mktemp("int8_precision") / "lowdim"
    writer.export_bundle(tiny_runs["lowdim"], out, precision="int8", ddim_steps=(5, 10), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, tiny_runs) -> Path:
    out = tmp_path_factory.mktemp("fp16_precision") / "lowdim"
    writer.export_bundle(tiny_runs["lowdim"], out, fp16=True, ddim_steps=(10,), log=lambda s: None)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(bundle: Path, fn) -> None:
    path = bundle / "policy.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m, indent=2))


def _swap(bundle: Path, graph: str, src: Path) -> None:
    """Replace the bundle's `graph` file by `src` and update its sha256 (the precision label stays)."""
    name = json.loads((bundle / "policy.json").read_text())["models"][graph]["file"]
    shutil.copyfile(src, bundle / name)
    _edit(bundle, lambda m: m["models"][graph].__setitem__("sha256", sha256_file(bundle / name)))


def _refused(bundle: Path) -> str:
    """The reader's one-line refusal."""
    with pytest.raises(DpkitError) as e:
        load_bundle(bundle)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(bundle / "policy.json") + ": "), msg
    return msg


def _precision(graph: Path) -> tuple[str, str]:
    info = onnx_info(graph)
    return info["precision"], info["evidence"]


def test_graph_precision_derived_from_the_graphs(int8_bundle, tiny_bundles):
    den, evidence = _precision(int8_bundle / "denoiser.onnx")
    assert den == "int8" and "MatMulInteger" in evidence and "DynamicQuantizeLinear" in evidence
    assert _precision(int8_bundle / "encoder.onnx")[0] == "fp32"
    for g in ("encoder", "denoiser"):
        assert _precision(tiny_bundles["lowdim"] / f"{g}.onnx") == ("fp32", FP32_EVIDENCE)
    info = onnx_info(GOLDEN / "denoiser.onnx")
    assert info["op_types"]["Conv"] > 0 and info["tensor_types"][1] == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_reported_precision_is_the_graphs(int8_bundle, tiny_bundles, backend):
    p = load_policy(int8_bundle, backend=backend)
    q = load_policy(tiny_bundles["lowdim"], backend=backend)
    if backend == "cpp":
        assert p.info["precision"] == "int8" and q.info["precision"] == "fp32"
    else:
        assert p.bundle.precision == "int8" and q.bundle.precision == "fp32"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bundle_without_precision_keys_derives_them(tiny_bundles, tmp_path, backend):
    b = _copy(tiny_bundles["lowdim"], tmp_path / "old")

    def strip(m):
        for g in ("encoder", "denoiser"):
            m["models"][g].pop("precision", None)
    _edit(b, strip)
    p = load_policy(b, backend=backend)
    assert (p.info["precision"] if backend == "cpp" else p.bundle.precision) == "fp32"


def test_int8_denoiser_labelled_fp32(int8_bundle, tmp_path):
    b = _copy(int8_bundle, tmp_path / "b")

    def relabel(m):
        m["models"]["denoiser"]["precision"] = "fp32"
        del m["models"]["denoiser"]["quantization"]
    _edit(b, relabel)
    msg = _refused(b)
    assert 'models.denoiser.precision "fp32" does not match the graph: denoiser.onnx is int8 (' in msg, msg
    assert "integer quantization nodes: DynamicQuantizeLinear, MatMulInteger" in msg, msg


def test_int8_denoiser_without_precision(int8_bundle, tmp_path):
    b = _copy(int8_bundle, tmp_path / "b")

    def strip(m):
        del m["models"]["denoiser"]["precision"]
        del m["models"]["denoiser"]["quantization"]
    _edit(b, strip)
    msg = _refused(b)
    assert ('models.denoiser.precision (missing; "fp32" from dtype "float32") does not match the graph: '
            "denoiser.onnx is int8 (") in msg, msg


def test_int8_graph_swapped_into_an_fp32_bundle(int8_bundle, tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["lowdim"], tmp_path / "b")
    _swap(b, "denoiser", int8_bundle / "denoiser.onnx")
    msg = _refused(b)
    assert 'models.denoiser.precision "fp32" does not match the graph: denoiser.onnx is int8 (' in msg, msg


def test_fp32_graph_swapped_into_an_int8_bundle(int8_bundle, tiny_bundles, tmp_path):
    b = _copy(int8_bundle, tmp_path / "b")
    _swap(b, "denoiser", tiny_bundles["lowdim"] / "denoiser.onnx")  # the quantization block stays
    msg = _refused(b)
    assert f'models.denoiser.precision "int8" does not match the graph: denoiser.onnx {FP32}' in msg, msg


def test_fp32_encoder_labelled_int8(int8_bundle, tmp_path):
    b = _copy(int8_bundle, tmp_path / "b")

    def relabel(m):
        m["models"]["encoder"]["precision"] = "int8"
        m["models"]["encoder"]["quantization"] = dict(m["models"]["denoiser"]["quantization"])
    _edit(b, relabel)
    msg = _refused(b)
    assert f'models.encoder.precision "int8" does not match the graph: encoder.onnx {FP32}' in msg, msg


def test_int8_bundle_intact_loads_with_sha256_checked(int8_bundle):
    assert load_bundle(int8_bundle).precision == "int8"


def test_fp16_label_fits_fp16_graphs_and_graphs_with_nothing_to_convert(fp16_bundle):
    assert _precision(fp16_bundle / "denoiser.onnx")[0] == "fp16"
    # --fp16 converts matrix products and convolutions; the low-dim encoder (a normalization) has none, so its
    # graph is the fp32 one and the label fp16 fits it (the bundle loads). A denoiser always has them
    # (precision_fits itself: cpp/tests/test_manifest.cpp, Manifest.OnnxInfo).
    assert _precision(fp16_bundle / "encoder.onnx")[0] == "fp32"
    assert load_bundle(fp16_bundle).manifest["models"]["encoder"]["precision"] == "fp16"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_bundle_reports_fp16(fp16_bundle, backend):
    p = load_policy(fp16_bundle, backend=backend)
    assert (p.info["precision"] if backend == "cpp" else p.bundle.precision) == "fp16"


def test_fp16_denoiser_labelled_fp32(fp16_bundle, tmp_path):
    b = _copy(fp16_bundle, tmp_path / "b")

    def relabel(m):
        m["models"]["denoiser"]["precision"] = "fp32"
        m["models"]["denoiser"]["dtype"] = "float32"
    _edit(b, relabel)
    msg = _refused(b)
    assert 'models.denoiser.precision "fp32" does not match the graph: denoiser.onnx is fp16 (' in msg, msg
    assert "float16 tensors, no integer quantization nodes)" in msg, msg


def test_fp16_graph_swapped_into_an_fp32_bundle(fp16_bundle, tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["lowdim"], tmp_path / "b")
    _swap(b, "denoiser", fp16_bundle / "denoiser.onnx")
    msg = _refused(b)
    assert 'models.denoiser.precision "fp32" does not match the graph: denoiser.onnx is fp16 (' in msg, msg


def test_int8_graph_swapped_into_an_fp16_bundle(fp16_bundle, int8_bundle, tmp_path):
    b = _copy(fp16_bundle, tmp_path / "b")
    _swap(b, "denoiser", int8_bundle / "denoiser.onnx")
    msg = _refused(b)
    assert 'models.denoiser.precision "fp16" does not match the graph: denoiser.onnx is int8 (' in msg, msg
