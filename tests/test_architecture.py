"""The import direction of the pipeline: train -> export -> bundle -> runtime, and consumers on top.

Every import of a dpkit module in the source is checked against one table: `import dpkit.<room>...`,
`from dpkit.<room> import ...` and relative imports (`from .x import y`, `from ..eval import z`, resolved
against the file's package), at module level and inside functions alike. The Python scripts under cpp/
(the C++ tests' fixture makers and examples) are a room of their own. Arrows that run back up the
pipeline are how a runtime-only deployment ends up needing torch, or the trainer needing the simulator;
each remaining one is in EXCEPTIONS with its reason, and must be a lazy import (inside a function), so
importing the module never pulls the other room in.

The C++ includes follow one rule too (`test_cpp_includes_follow_the_layers`): the public header
cpp/include/dpkit/ includes only the standard library and other public headers (no cpp/src internals, no
ONNX Runtime, nlohmann or pybind11: a consumer compiles it with nothing else installed); cpp/src includes
only itself and the public headers; consumers (cpp/examples, cpp/python, cpp/tests/consumer) include only
the public headers; the C++ unit tests (cpp/tests/*.cpp) may also include cpp/src internals (white-box).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> the dpkit room it is installed as (pyproject.toml wheel.packages).
ROOMS = {"dpkit": "core", "train": "train", "export": "export", "runtime": "runtime", "eval": "eval",
         "benchmarks": "benchmarks", "convert": "convert"}
# room -> rooms it may import. "core" is dpkit/ itself (errors, io, sampling_args).
ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "export": {"core", "train", "export", "runtime"},  # export verifies its graphs with the runtime
    "runtime": {"core", "runtime"},
    "eval": {"core", "runtime", "eval"},
    "benchmarks": {"core", "train", "export", "runtime", "eval", "benchmarks"},
    "convert": {"core", "train", "convert"},  # a converter writes training runs; export reads them as usual
    # cpp/**/*.py: the C++ tests' fixture makers build bundles with the Python stages and read the numpy
    # reference; examples use the core. Never the consumers (eval, benchmarks) or the converters.
    "cpp": {"core", "train", "export", "runtime"},
}
# (file, room it may also import) -> why. Composition roots and the one backend that is the model itself;
# every entry must be a lazy import (inside a function), and every entry must still be needed.
EXCEPTIONS = {
    ("runtime/torch_policy.py", "train"):
        'the "torch" backend is the PyTorch model itself: imported when a torch policy is loaded, so the '
        "ort/cpp runtime never needs torch",
    ("train/cli.py", "eval"):
        "dpkit-train wires the gym-pusht rollout evaluator into the trainer only when train.eval_every > 0; "
        "the trainer itself never imports the simulator",
    ("dpkit/demo.py", "train"):
        "`make demo` finds or downloads the PushT dataset before it starts dpkit-train; the other stages it "
        "runs as dpkit-* subprocesses, importing nothing of them",
}
SUBPACKAGE_ROOM = {"train": "train", "export": "export", "runtime": "runtime", "eval": "eval",
                   "benchmarks": "benchmarks", "convert": "convert"}


def _package(path: Path) -> list[str] | None:
    """The dotted package a source file is installed in (dpkit/, or dpkit.<room>[.sub]); None outside."""
    rel = path.relative_to(ROOT).parts
    if rel[0] not in ROOMS:
        return None
    return ["dpkit"] + ([] if rel[0] == "dpkit" else [rel[0]]) + list(rel[1:-1])


def _dpkit_imports(path: Path) -> list[tuple[str, bool, int]]:
    """(dotted dpkit module, lazy, line) for every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    lazy_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy_nodes.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package(path)
                assert package is not None, f"{path}: relative import outside the dpkit package"
                assert node.level <= len(package), f"{path}:{node.lineno}: relative import above dpkit"
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "dpkit":
                out.append((name, id(node) in lazy_nodes, node.lineno))
    return out


def _room_of(module: str) -> str:
    parts = module.split(".")
    return SUBPACKAGE_ROOM.get(parts[1], "core") if len(parts) > 1 else "core"


def _imported_rooms(path: Path) -> set[str]:
    return {_room_of(name) for name, _, _ in _dpkit_imports(path)}


def _python_files() -> list[tuple[Path, str]]:
    files = [(path, room) for folder, room in ROOMS.items() for path in sorted((ROOT / folder).rglob("*.py"))]
    files += [(path, "cpp") for path in sorted((ROOT / "cpp").rglob("*.py"))]
    return files


def test_imports_follow_the_pipeline():
    bad, used = [], set()
    for path, room in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        for name, lazy, line in _dpkit_imports(path):
            target = _room_of(name)
            if target in ALLOWED[room]:
                continue
            if (rel, target) not in EXCEPTIONS:
                bad.append(f"{rel}:{line} ({room}) imports {name}")
            elif not lazy:
                bad.append(f"{rel}:{line} ({room}) imports {name} at module level (listed exceptions must be lazy)")
            else:
                used.add((rel, target))
    assert not bad, "imports against the pipeline direction:\n" + "\n".join(bad)
    stale = set(EXCEPTIONS) - used
    assert not stale, f"EXCEPTIONS no longer needed (remove them): {sorted(stale)}"
    assert all(reason.strip() for reason in EXCEPTIONS.values())


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    """The checker sees `from .x import y` and `from ..room import z` as the dpkit modules they are."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "runtime" / "sub").mkdir(parents=True)
    f = tmp_path / "runtime" / "sub" / "m.py"
    f.write_text("from . import a\nfrom ..bundle import B\nfrom ...train.policy import P\n"
                 "def g():\n    from ...eval import pusht\n")
    got = {(name, lazy) for name, lazy, _ in _dpkit_imports(f)}
    assert ("dpkit.runtime.sub", False) in got and ("dpkit.runtime.sub.a", False) in got
    assert ("dpkit.runtime.bundle.B", False) in got
    assert ("dpkit.train.policy.P", False) in got and ("dpkit.eval.pusht", True) in got
    assert _imported_rooms(f) == {"runtime", "train", "eval"}


INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
THIRD_PARTY = ("onnxruntime", "nlohmann/", "pybind11/", "cpu_provider_factory", "tensorrt_provider_factory")
# folder under cpp/ -> the project folders its includes may resolve into
CPP_LAYERS = {
    "include": {"include"},
    "src": {"src", "include"},
    "examples": {"include"},
    "python": {"include"},
    "tests/consumer": {"include"},
    "tests": {"src", "include"},  # unit tests are white-box
}
# (file, header) pairs allowed across the layers above, each with its reason.
CPP_EXCEPTIONS = {
    # The pybind module also hands the one bundle reader (read_bundle, read_onnx_info, bundle_limits) to Python,
    # whose dpkit.runtime.bundle is a typed view over it; the reader stays out of the installed public header.
    ("cpp/python/module.cpp", "manifest.hpp"),
}


def _cpp_layer(path: Path) -> str:
    rel = path.relative_to(ROOT / "cpp").as_posix()
    return max((layer for layer in CPP_LAYERS if rel.startswith(layer + "/")), key=len)


def _resolve_include(path: Path, name: str) -> str | None:
    """The cpp/ folder a project include resolves into (next to the file, then the include paths), or None
    for a header from elsewhere (the standard library, the system, third-party packages)."""
    for base, layer in ((path.parent, _cpp_layer(path)), (ROOT / "cpp" / "include", "include"),
                        (ROOT / "cpp" / "src", "src")):
        if (base / name).is_file():
            return "include" if (base / name).resolve().is_relative_to(ROOT / "cpp" / "include") else \
                "src" if (base / name).resolve().is_relative_to(ROOT / "cpp" / "src") else layer
    return None


def test_cpp_includes_follow_the_layers():
    files = [p for p in sorted((ROOT / "cpp").rglob("*")) if p.suffix in (".hpp", ".h", ".cpp", ".cc")]
    assert any(p.parts[-2] == "dpkit" for p in files), "the public header folder moved: update this test"
    bad = []
    for path in files:
        layer = _cpp_layer(path)
        rel = path.relative_to(ROOT).as_posix()
        for _, name in INCLUDE.findall(path.read_text()):
            where = _resolve_include(path, name)
            if where is None:
                if layer == "include" and name.startswith(THIRD_PARTY):
                    bad.append(f"{rel} includes {name}: the public header must compile with nothing else installed")
                continue
            if where not in CPP_LAYERS[layer] and (rel, name) not in CPP_EXCEPTIONS:
                bad.append(f"{rel} ({layer}) includes {name} from cpp/{where}")
    assert not bad, "C++ includes against the layers:\n" + "\n".join(bad)


def test_the_table_covers_every_room():
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(ROOMS), f"a package folder without a place in the import table: {folders ^ set(ROOMS)}"


def test_runtime_imports_without_torch():
    """A runtime-only install (bundle + "ort"/"cpp") needs no torch, diffusers or gym."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'gymnasium', 'gym_pusht', 'zarr', 'accelerate'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dpkit.runtime, dpkit.runtime.bundle, dpkit.runtime.sampling, dpkit.runtime.backend\n"
        "import dpkit.runtime.ort_policy\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
