"""The import direction of the pipeline: train -> export -> bundle -> runtime, and consumers on top.

Every `import dpkit.<room>...` in the source (module level and inside functions alike) is checked against
one table. Arrows that run back up the pipeline are how a runtime-only deployment ends up needing torch,
or the trainer needing the simulator; the two deliberate exceptions are named, with their reason.
"""

from __future__ import annotations

import ast
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
}
# (file, room it may also import): composition roots, each with its reason.
EXCEPTIONS = {
    ("runtime/torch_policy.py", "train"),  # the "torch" backend is the PyTorch model itself (lazy import)
    ("train/cli.py", "eval"),  # dpkit-train wires the gym-pusht rollout evaluator into the trainer
    ("dpkit/demo.py", "train"), ("dpkit/demo.py", "export"), ("dpkit/demo.py", "runtime"),
    ("dpkit/demo.py", "eval"), ("dpkit/demo.py", "benchmarks"),  # `make demo` runs the whole pipeline
}
SUBPACKAGE_ROOM = {"train": "train", "export": "export", "runtime": "runtime", "eval": "eval",
                   "benchmarks": "benchmarks", "convert": "convert"}


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "dpkit":
                continue
            rooms.add(SUBPACKAGE_ROOM.get(parts[1], "core") if len(parts) > 1 else "core")
    return rooms


def test_imports_follow_the_pipeline():
    bad = []
    for folder, room in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for target in sorted(_imported_rooms(path) - ALLOWED[room]):
                if (rel, target) not in EXCEPTIONS:
                    bad.append(f"{rel} ({room}) imports dpkit.{target}")
    assert not bad, "imports against the pipeline direction:\n" + "\n".join(bad)


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
