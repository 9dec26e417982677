"""Read a torch zip checkpoint (the original diffusion_policy's `.ckpt`) without executing anything in it.

    from dpkit.convert.unpickle import load_torch_zip
    payload = load_torch_zip("latest.ckpt")   # plain dicts, lists, numbers, strings and torch tensors

A pickle is a small program: every global it names is looked up and may be called. `torch.load` with
`weights_only=False` would import and call whatever the file names (and the original's files name
omegaconf and dill classes, so `weights_only=True` refuses them). This reader allows only the globals a
checkpoint needs, each replaced by a stand-in that builds plain data:

  torch tensors       torch._utils._rebuild_tensor_v2 / _rebuild_parameter over typed storages read
                      from the zip's data/ records (bounds checked)
  containers          collections.OrderedDict, collections.defaultdict (no factory is ever called)
  OmegaConf configs   omegaconf DictConfig / ListConfig / value nodes / metadata -> dicts, lists, values
  helpers             _codecs.encode (bytes of protocol-2 pickles), dill's _load_type (builtin types
                      by name, from a fixed list), typing.Any (a marker)

Every other global — os.system, builtins.eval, subprocess.Popen, any class — is refused with a
DpkitError naming it, before anything is called. No omegaconf, dill or hydra is needed.

Bounds, checked before anything is allocated (each refusal is an InputError naming the file):
  bytes               the archive's members (their sizes from the zip directory, before reading) plus every
                      storage and tensor rebuilt from them count against MAX_BYTES (8 GiB per file: a
                      checkpoint of up to about 2.5 GB reads within it)
  tensor views        no negative size, stride or offset; no stride 0 across more than one element (a
                      broadcast view that clone() would materialize); the view's extent (offset +
                      sum((size-1)*stride) + 1) within its storage; no more elements than its storage
                      holds (overlapping views)
  nesting             containers nested deeper than MAX_DEPTH levels are refused (a pickle nested 200k
                      deep gives one line, not a RecursionError)
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dpkit.errors import DpkitError, InputError

MAX_BYTES = 8 << 30  # per checkpoint file: the archive's members plus every storage and tensor rebuilt from them
MAX_DEPTH = 200  # container nesting (a real checkpoint nests a few dozen levels at most)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Builtin types dill may name through _load_type (e.g. a defaultdict's factory); nothing else.
_DILL_TYPES = {"dict": dict, "list": list, "tuple": tuple, "set": set, "int": int, "float": float, "str": str,
               "bool": bool, "bytes": bytes, "NoneType": type(None)}


class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only carries the dtype to the persistent-id reader."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Any:
    """typing.Any as a marker (OmegaConf metadata names it as a key/element type)."""

    def __repr__(self) -> str:
        return "Any"


_ANY = _Any()


class _OmegaNode:
    """Stand-in for an OmegaConf object: records the pickled state; `plain()` turns it into plain data."""

    kind = "node"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _DictConfig(_OmegaNode):
    kind = "dict"


class _ListConfig(_OmegaNode):
    kind = "list"


class _ValueNode(_OmegaNode):
    kind = "value"


class _Metadata(_OmegaNode):
    kind = "metadata"


class _DefaultDict(dict):
    """collections.defaultdict rebuilt as a plain dict: its factory (a global) is never called."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise DpkitError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _dill_load_type(name: Any) -> type:
    if name not in _DILL_TYPES:
        raise DpkitError(f"refusing dill._dill._load_type({name!r}) (only builtin container and number types)")
    return _DILL_TYPES[name]


def _plain(obj: Any, source: str = "pickle", depth: int = 0) -> Any:
    """OmegaConf stand-ins (recursively) -> dicts, lists and values; other objects as they are. Nesting
    deeper than MAX_DEPTH is refused (InputError) instead of exhausting Python's recursion limit."""
    if depth > MAX_DEPTH:
        raise InputError(f"{source}: its pickle nests containers deeper than {MAX_DEPTH} levels; refused")
    d = depth + 1
    if isinstance(obj, _OmegaNode):
        state = obj.state if isinstance(obj.state, dict) else {}
        if obj.kind == "value":
            return _plain(state.get("_val"), source, d)
        if obj.kind == "metadata":
            return None
        content = state.get("_content")
        if obj.kind == "dict":
            return {k: _plain(v, source, d) for k, v in content.items()} if isinstance(content, dict) else content
        return [_plain(v, source, d) for v in content] if isinstance(content, (list, tuple)) else content
    if isinstance(obj, dict):
        items = ((k, _plain(v, source, d)) for k, v in obj.items())
        return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [_plain(v, source, d) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v, source, d) for v in obj)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str, records: dict[str, bytes] | None,
                 budget: int = MAX_BYTES):
        super().__init__(file)
        self.source = source
        self.records = records
        self.storages: dict[str, torch.Tensor] = {}
        self.budget = budget  # bytes the rebuilt tensors may still allocate

    def _spend(self, nbytes: int, what: str) -> None:
        if nbytes > self.budget:
            raise InputError(f"{self.source}: {what} needs {nbytes} bytes, beyond the {self.budget} bytes left "
                             f"of the {MAX_BYTES >> 30} GiB per-file limit; refused")
        self.budget -= nbytes

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("collections", "defaultdict"): _DefaultDict,
            ("_codecs", "encode"): _codecs_encode,
            ("dill._dill", "_load_type"): _dill_load_type,
            ("typing", "Any"): _ANY,
            ("omegaconf.dictconfig", "DictConfig"): _DictConfig,
            ("omegaconf.listconfig", "ListConfig"): _ListConfig,
            ("omegaconf.base", "ContainerMetadata"): _Metadata,
            ("omegaconf.base", "Metadata"): _Metadata,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "omegaconf.nodes" and name.endswith("Node"):
            return _ValueNode  # AnyNode, StringNode, IntegerNode, FloatNode, BooleanNode, ...
        raise DpkitError(f"{self.source}: its pickle references {module}.{name}, which a checkpoint never needs; "
                         f"refused (nothing from the file was executed)")

    def persistent_load(self, pid: Any) -> Any:
        if self.records is None:
            raise DpkitError(f"{self.source}: unexpected persistent id in an embedded pickle")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise DpkitError(f"{self.source}: unsupported tensor storage reference ({type(pid).__name__})")
        stype, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:
            data = self.records.get(key)
            if data is None:
                raise DpkitError(f"{self.source}: tensor storage data/{key} is missing (truncated checkpoint?)")
            itemsize = torch.empty((), dtype=stype.dtype).element_size()
            if numel < 0:
                raise InputError(f"{self.source}: tensor storage data/{key} has a negative size ({numel}); refused")
            if len(data) < numel * itemsize:
                raise DpkitError(f"{self.source}: tensor storage data/{key} holds {len(data)} bytes, "
                                 f"{numel * itemsize} expected (truncated checkpoint?)")
            self._spend(numel * itemsize, f"tensor storage data/{key}")
            raw = bytearray(data[: numel * itemsize])
            self.storages[key] = torch.frombuffer(raw, dtype=stype.dtype) if numel else torch.empty(0, dtype=stype.dtype)
        return self.storages[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
            raise DpkitError(f"{self.source}: malformed tensor record")
        if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) and len(size) <= 64
                and all(type(v) is int for v in (offset, *size, *stride))):
            raise DpkitError(f"{self.source}: malformed tensor record (size {size!r:.80}, stride {stride!r:.80})")
        if any(v < 0 for v in (offset, *size, *stride)):
            raise InputError(f"{self.source}: a tensor record has a negative size, stride or offset "
                             f"(size {list(size)}, stride {list(stride)}, offset {offset}); refused")
        # Bounds before any allocation: Python ints, so no product below can overflow.
        if any(st == 0 and s > 1 for s, st in zip(size, stride)):
            raise InputError(f"{self.source}: a tensor record of shape {list(size)} has stride 0 "
                             f"(stride {list(stride)}), a broadcast view no checkpoint holds; refused")
        n = 1
        for s in size:
            n *= s
        numel = storage.numel()
        if n:
            extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
            if extent > numel:
                raise InputError(f"{self.source}: a tensor of shape {list(size)} (stride {list(stride)}, offset "
                                 f"{offset}) reaches past its storage ({numel} values); refused")
            if n > numel:
                raise InputError(f"{self.source}: a tensor of shape {list(size)} has {n} values but its storage "
                                 f"only {numel} (overlapping view); refused")
        elif offset > numel:
            raise InputError(f"{self.source}: an empty tensor's offset {offset} is past its storage ({numel} values)")
        self._spend(n * storage.element_size(), f"a tensor of shape {list(size)}")
        return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, *_rest: Any) -> Any:
    if not isinstance(data, torch.Tensor):
        raise DpkitError("malformed parameter record in the checkpoint")
    return data


def _unpickle(data: bytes, source: str, records: dict[str, bytes] | None, budget: int = MAX_BYTES) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, records, budget).load()
    except DpkitError:
        raise
    except (RecursionError, MemoryError) as e:
        raise InputError(f"{source}: its pickle is too deeply nested or too large to read "
                         f"({type(e).__name__}); refused") from None
    except Exception as e:  # malformed pickles raise many types (UnpicklingError, EOFError, TypeError, ...)
        raise DpkitError(f"{source}: cannot read its pickle ({type(e).__name__}: {str(e)[:120]})") from None


def loads_plain(data: bytes, source: str) -> Any:
    """A pickle without tensors (e.g. the original's `pickles` entries), read with the same restrictions."""
    if len(data) > MAX_BYTES:
        raise InputError(f"{source}: a {len(data)}-byte pickle is beyond the {MAX_BYTES >> 30} GiB limit; refused")
    return _plain(_unpickle(data, source, None), source)


def load_torch_zip(path: str | Path) -> Any:
    """The object a `torch.save` zip archive holds, with tensors as torch tensors and OmegaConf as plain data."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise DpkitError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DpkitError(f"{path} is not a torch checkpoint archive or is truncated ({e})") from None
    with zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise DpkitError(f"{path} is not a torch checkpoint archive (no single <folder>/data.pkl)")
        top = pkls[0][: -len("data.pkl")]
        # Sizes from the zip's directory, before reading anything (the reader stops at these sizes).
        total = sum(i.file_size for i in zf.infolist() if i.filename == pkls[0] or i.filename.startswith(top + "data/"))
        if total > MAX_BYTES:
            raise InputError(f"{path}: its members hold {total} bytes, beyond the {MAX_BYTES >> 30} GiB per-file "
                             f"limit; refused")
        try:
            order = zf.read(top + "byteorder").decode().strip() if top + "byteorder" in names else "little"
            if order != "little":
                raise DpkitError(f"{path}: byte order {order!r} is not supported")
            records = {n[len(top) + len("data/"):]: zf.read(n) for n in names if n.startswith(top + "data/")}
            data = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # CRC errors, truncated members
            raise DpkitError(f"{path} is corrupt or truncated ({e})") from None
    return _plain(_unpickle(data, str(path), records, MAX_BYTES - total), str(path))
