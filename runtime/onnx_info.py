"""What a bundle reader must know about an .onnx file without ONNX or ONNX Runtime: its declared inputs and
outputs, and every external-data file its tensors reference.

    from dpkit.runtime.onnx_info import read_onnx_info
    info = read_onnx_info("bundle/denoiser.onnx")
    info.inputs      # [("sample", 1, (None, 16, 2)), ("timestep", 7, (None,)), ("cond", 1, (None, 40))]
    info.external    # {"denoiser.onnx.data"}: files that ONNX Runtime would load beside the graph
    graph_precision(info)   # ("int8", "12 quantization nodes (...) and 24 int8/uint8 tensors"): what the graph is

A small walk over the protobuf wire format (numpy-only runtime: no `onnx` package). Only the messages
that can hold a tensor are entered (model, graph, node, attribute, function, training info, sparse
tensor); everything else, weights included, is skipped by its length, so a 1 GB graph costs a few page
reads. The C++ reader (cpp/src/manifest.cpp, read_onnx_info) walks the same fields the same way.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from dpkit.errors import DpkitError

# ONNX TensorProto.DataType values the bundle contract uses.
FLOAT, INT64 = 1, 7
DTYPE_NAMES = {FLOAT: "float32", INT64: "int64", 10: "float16", 11: "float64", 6: "int32"}
# Subgraphs (If/Loop bodies inside attributes) nest; deeper than this is refused, not recursed into.
MAX_NESTING = 32

# message kind -> {field number: message kind}; "tensor" fields are TensorProto, "io" ValueInfoProto.
_SCHEMA = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse", 11: "input", 12: "output"},
    "subgraph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "subgraph", 10: "tensor", 11: "subgraph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "training": {1: "subgraph", 2: "subgraph"},
    "sparse": {1: "tensor", 2: "tensor"},
}


# Node op types that compute in integers: a graph with any of them (or with int8/uint8 tensors) is an int8
# graph (docs/bundle-format.md, "Precision"). ONNX Runtime's dynamic quantization (export/quantize.py) writes
# DynamicQuantizeLinear + MatMulInteger; static QDQ graphs QuantizeLinear/DequantizeLinear; QLinear* ops too.
QUANT_OPS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
                       "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
                       "QAttention", "DynamicQuantizeLSTM"})
INT8, UINT8, FLOAT16 = 3, 2, 10
# The node types `--fp16` converts (matrix products and convolutions, export/onnx_export.py HALF_LAYERS): a
# graph without any (the low-dim encoder, a normalization) is the same graph in fp32 and fp16, so either label fits.
HALF_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def is_quant_op(op_type: str) -> bool:
    return op_type in QUANT_OPS or op_type.startswith("QLinear")


@dataclass
class OnnxInfo:
    inputs: list[tuple[str, int, tuple[int | None, ...]]] = field(default_factory=list)  # (name, elem type, dims)
    outputs: list[tuple[str, int, tuple[int | None, ...]]] = field(default_factory=list)
    initializers: set[str] = field(default_factory=set)
    external: set[str] = field(default_factory=set)  # `location` of every tensor stored outside the file
    op_types: dict[str, int] = field(default_factory=dict)  # node op type -> count (subgraphs and functions too)
    tensor_types: dict[int, int] = field(default_factory=dict)  # tensor data_type -> count (every tensor walked)

    def graph_inputs(self) -> list[tuple[str, int, tuple[int | None, ...]]]:
        """Inputs a caller feeds (old IR versions also list initializers as inputs)."""
        return [i for i in self.inputs if i[0] not in self.initializers]


class _Malformed(Exception):
    pass


class OnnxError(DpkitError):
    """An .onnx file that cannot be read or parsed; `reason` completes a sentence about the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.reason = reason


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf, i: int, end: int):
    """(field number, wire type, value or start, end) for each field of the message buf[i:end]."""
    while i < end:
        key, i = _varint(buf, i, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i, end)
            yield num, 0, v, i
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise _Malformed
            yield num, 2, i, i + n
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > end:
                raise _Malformed
        else:  # groups (3, 4) are not used by ONNX
            raise _Malformed


def _text(buf, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _tensor(buf, a: int, b: int, info: OnnxInfo, top: bool) -> None:
    location, external, name, dtype = None, False, None, 0
    for num, wire, s, e in _fields(buf, a, b):
        if num == 2 and wire == 0:  # data_type
            dtype = s
        elif num == 14 and wire == 0:  # data_location: 1 = EXTERNAL
            external = external or s == 1
        elif num == 13 and wire == 2:  # external_data: StringStringEntryProto {key = 1, value = 2}
            external = True
            key = value = None
            for n2, w2, s2, e2 in _fields(buf, s, e):
                if w2 == 2 and n2 == 1:
                    key = _text(buf, s2, e2)
                elif w2 == 2 and n2 == 2:
                    value = _text(buf, s2, e2)
            if key == "location":
                location = value
        elif num == 8 and wire == 2:
            name = _text(buf, s, e)
    if external:
        info.external.add(location if location is not None else "")  # "" = external with no location
    info.tensor_types[dtype] = info.tensor_types.get(dtype, 0) + 1
    if top and name is not None:
        info.initializers.add(name)


def _value_info(buf, a: int, b: int) -> tuple[str, int, tuple[int | None, ...]]:
    """ValueInfoProto {name = 1, type = 2: TypeProto {tensor_type = 1: {elem_type = 1, shape = 2}}}."""
    name, elem, dims = "", 0, []
    for num, wire, s, e in _fields(buf, a, b):
        if num == 1 and wire == 2:
            name = _text(buf, s, e)
        elif num == 2 and wire == 2:
            for n2, w2, s2, e2 in _fields(buf, s, e):
                if n2 != 1 or w2 != 2:
                    continue
                for n3, w3, s3, e3 in _fields(buf, s2, e2):
                    if n3 == 1 and w3 == 0:
                        elem = s3
                    elif n3 == 2 and w3 == 2:
                        for n4, w4, s4, e4 in _fields(buf, s3, e3):  # TensorShapeProto.dim
                            if n4 != 1 or w4 != 2:
                                continue
                            value = None
                            for n5, w5, s5, _ in _fields(buf, s4, e4):  # dim_value = 1, dim_param = 2
                                if n5 == 1 and w5 == 0:
                                    value = s5
                            dims.append(value)
    return name, elem, tuple(dims)


def _walk(buf, a: int, b: int, kind: str, info: OnnxInfo, depth: int) -> None:
    if depth > MAX_NESTING:
        raise _Malformed
    schema = _SCHEMA[kind]
    for num, wire, s, e in _fields(buf, a, b):
        if kind == "node" and num == 4 and wire == 2:  # NodeProto.op_type
            op = _text(buf, s, e)
            info.op_types[op] = info.op_types.get(op, 0) + 1
            continue
        sub = schema.get(num)
        if sub is None or wire != 2:
            continue
        if sub == "tensor":
            _tensor(buf, s, e, info, top=kind == "graph")
        elif sub == "input":
            info.inputs.append(_value_info(buf, s, e))
        elif sub == "output":
            info.outputs.append(_value_info(buf, s, e))
        else:
            _walk(buf, s, e, sub, info, depth + 1)


def graph_precision(info: OnnxInfo) -> tuple[str, str]:
    """(precision, evidence) of a graph from its nodes and tensors: "int8" when it has integer quantization
    nodes (QUANT_OPS, QLinear*) or int8/uint8 tensors, else "fp16" when it has float16 tensors, else "fp32".
    The evidence completes "<file> is <precision> (...)"; the C++ reader (cpp/src/manifest.cpp,
    graph_precision) words it the same."""
    quant = sorted(op for op in info.op_types if is_quant_op(op))
    n_quant = sum(info.op_types[op] for op in quant)
    n_int8 = info.tensor_types.get(INT8, 0) + info.tensor_types.get(UINT8, 0)
    n_fp16 = info.tensor_types.get(FLOAT16, 0)
    if n_quant or n_int8:
        parts = []
        if n_quant:
            parts.append(f"{n_quant} integer quantization nodes: {', '.join(quant)}")
        if n_int8:
            parts.append(f"{n_int8} int8/uint8 tensors")
        return "int8", "; ".join(parts)
    if n_fp16:
        return "fp16", f"{n_fp16} float16 tensors, no integer quantization nodes"
    return "fp32", "no integer quantization nodes, no int8/uint8 or float16 tensors"


def precision_fits(declared: str, derived: str, info: OnnxInfo) -> bool:
    """Whether a graph that is `derived` (graph_precision) may be labelled `declared`: only its own
    precision, except that an fp32 graph with no node `--fp16` converts (HALF_OPS) may be labelled fp16."""
    return declared == derived or (declared == "fp16" and derived == "fp32"
                                   and not any(info.op_types.get(op) for op in HALF_OPS))


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """Inputs, outputs and external-data references of the ONNX model at `path`; OnnxError (a DpkitError)
    if the file cannot be read or is not a well-formed protobuf."""
    info = OnnxInfo()
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise _Malformed
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk(buf, 0, size, "model", info, 0)
    except OSError as e:
        raise OnnxError(path, f"cannot be read ({e.strerror or e})") from None
    except (_Malformed, RecursionError):
        raise OnnxError(path, "is not a valid ONNX model (malformed protobuf)") from None
    return info
