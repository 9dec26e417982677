"""How many intra-op threads a dpkit stage uses, and how idle threads wait: one rule, used by every stage.

    from dpkit.threads import choose_threads
    choice = choose_threads(None, params=4_200_000)      # the `tiny` U-Net: 1 thread, no spinning
    choice = choose_threads(4)                           # an explicit request wins: 4 threads
    choice.to_json()                                     # what each CLI records under "threads"

Training, export, evaluation, dpkit-bench, the "torch", "ort" and "cpp" backends all ask `choose_threads`;
`--threads N` on every CLI and `threads=` in Python mean the same thing (0 or None: this rule). The
C++ `PolicyParams` defaults (1 thread, no spinning) are this rule's answer for a small model.

The rule, in order:
  1. an explicit `threads` (N >= 1) is used as given;
  2. else `$DPKIT_THREADS`, else `$OMP_NUM_THREADS` (the usual knob, honoured by every stage, ORT too);
  3. else one thread per `PARAMS_PER_THREAD` (20 M) model parameters, at least 1, at most the CPUs this
     process may use (`os.sched_getaffinity`, and a cgroup CPU quota when there is one). A model of
     unknown size gets 1.
Idle threads never spin (ONNX Runtime `allow_spinning=0`, OpenMP `OMP_WAIT_POLICY=PASSIVE`) unless
`spin=True` is asked for. The load average is recorded with the choice but does not change it: it lags by
a minute, counts this process itself, and says nothing about what starts next to us.

Why (2-core AMD EPYC VM; "busy" = one single-threaded busy process beside the measurement):
  - Small models on one thread. `tiny` (4.2 M) training, busy: 2 OpenMP threads 7.7 samples/s, 1 thread
    134.7 (17x; 2026-12-04). Quiet, 1 thread is not slower either: ~9 steps/s x 64 = ~576 samples/s
    (pusht_lowdim_cpu runs, README) against 457.6 with torch's default 2 threads
    (benchmarks/results/train_throughput.json). The C++ `tiny` DDIM-10 chunk at batch 1, busy: 2 threads
    + spinning 135.6 ms p50, 2 threads without spinning 64.5, 1 thread 50.1. A thread pool is only as
    fast as its slowest thread; once a sibling is descheduled every parallel region waits for it, and on
    small operators the waiting costs more than the second core gives.
    Measured again with this module on the shared VM (two other users' jobs running, load ~3;
    benchmarks/results/contention/): the C++ chunk p50 was 27.2 ms on 1 thread and 40.3 on 2 (no
    spinning), 34.2 and 57.5 with one more busy process.
  - Larger models on more threads: each operator is big enough to amortize the hand-offs (the 65.8 M
    U-Net's batch-1 denoiser call moves 263 MB of weights, memory-bound; 2 threads gave 14.7 ms in ORT;
    1 thread was not measured), hence one thread per 20 M parameters (65.8 M: 3, so every usable CPU on
    2 cores). This boundary is a judgement from the size of the work per operator, not a measurement.
  - No spinning: the 135.6 -> 64.5 ms above is spinning alone (a spinning thread burns the CPU its
    descheduled sibling needs); without a competitor spinning saves at most the wake-up latency, a few
    µs per parallel region. Training `tiny` with 2 OpenMP threads beside one busy process (same shared
    VM, benchmarks/bench_train.py --contention 1): libgomp's default spin kept 3 % of its throughput
    (516 -> 13.4 samples/s), OMP_WAIT_POLICY=PASSIVE 76 % (294.6 -> 222.8), 1 thread 63 % (412.1 -> 260.5).

The OpenMP wait policy is read once, when libgomp loads (at `import torch`): `prepare_openmp()` sets
`OMP_WAIT_POLICY=PASSIVE` (unless the user set it) and `import dpkit` calls it, so every dpkit entry point
sets it before torch loads. `openmp_state()` says whether it was in time (checked by a test through
libgomp's own `OMP_DISPLAY_ENV`: GOMP_SPINCOUNT becomes 0 instead of 300000).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from dpkit.errors import InputError

PARAMS_PER_THREAD = 20_000_000
"""Model parameters per intra-op thread (see the module docstring for the measurements)."""
WAIT_POLICY = "PASSIVE"
THREAD_ENV = ("DPKIT_THREADS", "OMP_NUM_THREADS")
"""Environment variables that request a thread count, most specific first."""
MAX_THREADS = 1024

# Whether torch (and with it libgomp) was already loaded when prepare_openmp first ran.
_openmp: dict[str, Any] = {"prepared": False, "torch_loaded_first": None, "set_by_dpkit": False}


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The thread count and wait policy a stage uses, and where they came from."""

    threads: int
    spin: bool
    source: str
    """"argument", "DPKIT_THREADS", "OMP_NUM_THREADS" or "policy"."""
    reason: str
    usable_cpus: int
    params: int | None = None
    load_avg: tuple[float, float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """What every CLI's JSON summary records under "threads"."""
        return {"threads": self.threads, "spin": self.spin, "wait_policy": "spin" if self.spin else "passive",
                "source": self.source, "reason": self.reason, "usable_cpus": self.usable_cpus,
                "params": self.params, "load_avg": list(self.load_avg) if self.load_avg else None,
                "openmp": openmp_state()}


def parse_threads(value: Any, what: str = "threads") -> int:
    """A requested thread count: an integer >= 0 (0: dpkit's rule), or a string of one. InputError else."""
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise InputError(f"{what} must be an integer >= 0 (0: chosen for this machine), got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_THREADS:
        raise InputError(f"{what} must be an integer in [0, {MAX_THREADS}] (0: chosen for this machine), got {value!r}")
    return int(value)


def usable_cpus(affinity: set[int] | None = None, cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    n = max(1, len(affinity))
    quota = _cgroup_quota(Path(cgroup_root) / "cpu.max")
    return max(1, min(n, math.ceil(quota))) if quota else n


def _cgroup_quota(path: Path) -> float | None:
    # "max 100000" (no limit) or "200000 100000" (2 CPUs' worth of time per period).
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return None


def choose_threads(threads: Any = None, *, params: int | None = None, spin: bool | None = None,
                   cpus: int | None = None, env: Mapping[str, str] | None = None) -> ThreadChoice:
    """The thread count and wait policy for a stage (the rule is in the module docstring).

    threads: the caller's request (None or 0: decide); params: the model's parameter count (for a bundle,
    `bundle_params`); spin: let idle ONNX Runtime threads spin (None: no); cpus: the usable CPUs (default:
    measured); env: the environment to read (default os.environ).
    """
    env = os.environ if env is None else env
    n = parse_threads(0 if threads is None else threads)
    cpus = usable_cpus() if cpus is None else int(cpus)
    if spin is not None and not isinstance(spin, bool):
        raise InputError(f"spin must be True, False or None, got {spin!r}")
    common = {"spin": bool(spin), "usable_cpus": cpus, "params": params, "load_avg": load_average()}
    if n:
        return ThreadChoice(n, source="argument", reason="requested", **common)
    for name in THREAD_ENV:
        text = env.get(name, "").split(",")[0].strip()  # OMP_NUM_THREADS may list nested levels: "4,2"
        if text:
            k = parse_threads(text, f"${name}")
            if k:
                return ThreadChoice(k, source=name, reason=f"${name}={text}", **common)
    if params is None:
        return ThreadChoice(1, source="policy", reason="model size unknown: 1 thread", **common)
    k = max(1, min(cpus, int(params) // PARAMS_PER_THREAD))
    why = (f"{params / 1e6:.1f} M parameters: 1 thread per {PARAMS_PER_THREAD // 1_000_000} M, "
           f"at most the {cpus} usable CPUs")
    return ThreadChoice(k, source="policy", reason=why, **common)


def resolve_spin(spin: bool | None = None, allow_spinning: bool | None = None) -> bool | None:
    """One answer from the two spellings of the wait policy (`spin` in Python, `allow_spinning` in C++)."""
    for name, v in (("spin", spin), ("allow_spinning", allow_spinning)):
        if v is not None and not isinstance(v, bool):
            raise InputError(f"{name} must be True, False or None, got {v!r}")
    if spin is not None and allow_spinning is not None and spin != allow_spinning:
        raise InputError(f"spin={spin} and allow_spinning={allow_spinning} disagree")
    return spin if spin is not None else allow_spinning


def bundle_params(bundle_dir: str | Path) -> int | None:
    """A bundle's model size in fp32-equivalent parameters: the bytes of its graphs (and external weight
    files) / 4. An int8 or fp16 bundle counts smaller, as its per-call work is. None when unreadable."""
    folder = Path(bundle_dir)
    try:
        files = [p for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")]
        return sum(p.stat().st_size for p in files if p.is_file()) // 4 or None
    except OSError:
        return None


def prepare_openmp(env: dict[str, str] | None = None) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose one; effective only before libgomp loads (torch)."""
    env = os.environ if env is None else env
    if not _openmp["prepared"]:
        _openmp["prepared"] = True
        _openmp["torch_loaded_first"] = "torch" in sys.modules
    if "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = WAIT_POLICY
        _openmp["set_by_dpkit"] = True


def openmp_state() -> dict[str, Any]:
    """The OpenMP wait policy in force and whether dpkit set it before torch loaded libgomp."""
    return {"wait_policy": os.environ.get("OMP_WAIT_POLICY"), "set_by_dpkit": _openmp["set_by_dpkit"],
            "in_time": _openmp["prepared"] and not _openmp["torch_loaded_first"]}


def apply_torch(choice: ThreadChoice) -> None:
    """Give torch's intra-op pool `choice.threads` threads (imports torch)."""
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)


def describe(choice: ThreadChoice) -> str:
    """One line for a CLI's log."""
    load = f", load average {choice.load_avg[0]:.2f}" if choice.load_avg else ""
    return (f"{choice.threads} thread{'s' if choice.threads != 1 else ''}, "
            f"{'spinning' if choice.spin else 'no spinning'} ({choice.reason}; {choice.usable_cpus} usable CPUs{load})")
