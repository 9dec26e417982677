"""Real-time chunk execution: one observation in, one action out, every tick, while the next chunk is sampled.

    from dpkit.runtime import load_policy
    from dpkit.runtime.realtime import RealTimeController
    ctl = RealTimeController(load_policy("bundles/tiny", backend="ort"), execution="async-inpaint", delay=2)
    for obs in stream:                       # obs: {key: (B, ...)} one step, e.g. from gym-pusht
        action = ctl.step(obs)               # (B, A) at once: the chunk is computed on a worker thread

This is the Python reference of the C++ `dpkit::RealTimeController` (same rules, same names). A tick is one
control period. `step` keeps the `To`-step observation history, executes the current chunk's actions and,
`delay + margin` actions before the chunk runs out, starts the next chunk on a worker thread from the
latest history. The new chunk is switched in at the index that matches the ticks elapsed since its
observations were taken; a late chunk leaves the robot holding the last action (a deadline miss).

Execution modes:
  "sync"           no overlap: when the chunk is exhausted the next one is requested and the last action is
                   held until it arrives; it then executes from its first action (a synchronous controller).
  "async"          the rest of the current chunk executes while the next one is computed; switch at index d.
  "async-inpaint"  as "async", and the new chunk is sampled to continue the `d` actions that execute in the
                   meantime (inpainting, dpkit.runtime.sampling.Inpaint), plus an optional weighted blend over
                   the following `blend` steps that the old trajectory also covers.

Time: `delay` fixes the inference delay d in ticks and makes time virtual — the chunk requested at tick n is
delivered at tick n + d exactly (the simulator waits for it if needed), so runs are reproducible. With
`delay=None` time is the wall clock (`clock`, seconds; `period` seconds per tick): a chunk is delivered at
the first tick after it is done, and d is estimated online as the largest of the recent latencies in ticks.
The first chunk is always awaited at the first tick (there is nothing to execute before it).

Thread safety: `step` is called from one control thread; the worker only runs the policy. An exception in
the worker is raised from the next `step`; `close()` (or the context manager) waits for the worker.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import numbers
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dpkit.errors import DpkitError, InputError
from dpkit.sampling_args import check_seed

EXECUTIONS = ("sync", "async", "async-inpaint")


@dataclass
class ControllerStats:
    ticks: int = 0
    requests: int = 0  # chunks requested (the last may still be pending)
    chunks: int = 0  # chunks switched in
    deadline_misses: int = 0  # async: ticks with nothing left to execute while a chunk was pending
    wait_ticks: int = 0  # sync: ticks holding the last action while the next chunk is computed
    latencies_s: list[float] = field(default_factory=list)  # wall time of each chunk's sampling

    def as_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) * 1e3
        return {"ticks": self.ticks, "requests": self.requests, "chunks": self.chunks, "deadline_misses": self.deadline_misses,
                "wait_ticks": self.wait_ticks,
                "latency_ms": {k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99),
                                                                             ("max", 100))} if len(lat) else None}


@dataclass
class _Chunk:
    tick: int  # tick of the newest observation it was sampled from
    traj: np.ndarray  # (B, H, A) normalized
    actions: np.ndarray  # (B, Ta, A) environment units


class RealTimeController:
    def __init__(self, policy: Any, execution: str = "async-inpaint", delay: int | None = None, margin: int = 0,
                 blend: int = 0, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, period: float = 0.1, history: int = 8,
                 worker_cpus: Sequence[int] = (), worker_priority: int = 0):
        """`worker_cpus`, `worker_priority`: as CppRealTimeController's (pin the worker thread; SCHED_FIFO),
        applied in the worker thread before its first chunk; `worker_setup` says what the OS allowed."""
        if execution not in EXECUTIONS:
            raise DpkitError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        check_timing(policy, delay, margin, blend, period)
        _int_in(history, "history", 1, 10**6)
        self.policy = policy
        self.execution = execution
        self.delay = None if delay is None else int(delay)
        self.margin, self.blend = int(margin), int(blend)
        self.choice = policy.resolve_sampler(sampler, steps)
        self.seed = check_seed(seed)
        self.clock, self.period = clock, float(period)
        self.stats = ControllerStats()
        self._recent = collections.deque(maxlen=int(history))
        self._history: collections.deque | None = None
        self._batch: int | None = None  # fixed by the first step, as the C++ controller's
        self._chunk: _Chunk | None = None
        self._index = 0
        self._last: np.ndarray | None = None
        self._pending: tuple[int, float, concurrent.futures.Future] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpkit-chunk")
        cpus, priority = _cpu_list(worker_cpus), _int_in(worker_priority, "worker_priority", 0, 99)
        self.worker_setup = self._pool.submit(apply_worker_options, cpus, priority).result()
        self._closed = False
        self.switched = False  # whether the last step's action came from a chunk switched in at that tick

    # ---- the control loop ---------------------------------------------------------------------------

    def step(self, obs: dict[str, Any]) -> np.ndarray:
        """Feed this tick's observation {key: (B, ...)}; get this tick's action (B, A) at once."""
        if self._closed:
            raise DpkitError("the controller is closed")
        n = self.stats.ticks
        self.switched = False
        self._observe(obs)
        if self._chunk is None and self._pending is None:  # start-up: the first chunk is awaited
            self._request(n, prefix=None)
            self._deliver(n, wait=True, at_index=0)
        else:
            self._poll(n)
        if self._exhausted() and self._pending is None:  # sync (or a chunk that ran out): ask now
            self._request(n, prefix=None)
            self._poll(n)
        if not self._exhausted() and self._pending is None and self.execution != "sync" \
                and self._remaining() <= self.expected_delay() + self.margin:
            self._request(n, prefix=self._prefix(n) if self.execution == "async-inpaint" else None)
            self._poll(n)
        self.stats.ticks += 1
        if self._exhausted():  # nothing to execute yet: hold the last target
            if self.execution == "sync":
                self.stats.wait_ticks += 1
            else:
                self.stats.deadline_misses += 1
            return self._last.copy()
        self._last = self._chunk.actions[:, self._index].copy()
        self._index += 1
        return self._last.copy()

    def expected_delay(self) -> int:
        """d in ticks: fixed, or (wall clock) the largest recent sampling latency rounded up to ticks."""
        if self.delay is not None:
            return self.delay
        if not self._recent:
            return 1
        return min(int(math.ceil(max(self._recent) / self.period)), int(self.policy.n_action_steps))

    def close(self) -> None:
        """Wait for the worker and stop it; later `step` calls raise."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "RealTimeController":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------------

    def _observe(self, obs: dict[str, Any]) -> None:
        if not isinstance(obs, dict) or set(obs) != set(self.policy.obs_keys):
            got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
            raise DpkitError(f"observation keys {got} do not match the policy's {list(self.policy.obs_keys)}")
        step = self._checked(obs)
        if self._history is None:  # as the original: the first observation repeated To times
            self._history = collections.deque([step] * int(self.policy.n_obs_steps), maxlen=int(self.policy.n_obs_steps))
        else:
            self._history.append(step)

    def _checked(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """This tick's observations as float32 copies, checked as the C++ controller checks them (the same
        words): numeric numpy arrays of shape (B, *shape), B fixed by the first step, finite values."""
        shapes = {o["name"]: tuple(o["shape"]) for o in self.policy.spec.observations}
        step = {}
        for k in self.policy.obs_keys:
            a = obs[k]
            if not isinstance(a, np.ndarray):
                raise InputError(f"observation '{k}' must be a numpy array, got {type(a).__name__}")
            if a.dtype.kind not in "fiu":
                raise InputError(f"observation '{k}' must hold numbers, got dtype {a.dtype}")
            batch = self._batch if self._batch is not None else (a.shape[0] if a.ndim else 1)
            if a.shape != (batch, *shapes[k]):
                raise InputError(f"observation '{k}' has shape {a.shape}, expected {(batch, *shapes[k])}")
            largest = getattr(self.policy, "max_batch", None) or max(batch, 1)
            if not 1 <= batch <= largest:
                raise InputError(f"batch {batch} is outside [1, max_batch = {largest}]")
            step[k] = np.array(a, dtype=np.float32)  # a copy: the caller may reuse its buffer
            if not np.all(np.isfinite(step[k])):
                raise InputError(f"observation '{k}' holds NaN or Inf")
            self._batch = batch
        return step

    def _stacked(self) -> dict[str, np.ndarray]:
        return {k: np.stack([h[k] for h in self._history], axis=1) for k in self.policy.obs_keys}

    def _remaining(self) -> int:
        return 0 if self._chunk is None else self._chunk.actions.shape[1] - self._index

    def _exhausted(self) -> bool:
        return self._remaining() <= 0

    def _prefix(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The normalized rows of the current trajectory that cover ticks n .. n + d - 1 (executing while the
        new chunk is computed; weight 1) and, with `blend`, the next ones it also covers (decaying weights)."""
        d = self.expected_delay()
        c = self._chunk
        fai = int(self.policy.spec.first_action_index)
        first = fai + (n - c.tick)  # row of the old trajectory at tick n
        horizon = c.traj.shape[1]
        n_rows = min(d + self.blend, horizon - first)
        if d == 0 or n_rows <= 0:
            return None
        weights = np.array([1.0 if j < d else 1.0 - (j - d + 1) / (self.blend + 1) for j in range(n_rows)])
        return c.traj[:, first:first + n_rows], weights

    def _request(self, n: int, prefix: tuple[np.ndarray, np.ndarray] | None) -> None:
        obs = self._stacked()
        # Chunk r of a run is sampled with a seed derived from (seed, r): reruns draw the same noise.
        seed = int(np.random.SeedSequence([self.seed, self.stats.requests]).generate_state(1)[0])
        self.stats.requests += 1
        kwargs: dict[str, Any] = {"seed": seed}
        if prefix is not None:
            kwargs.update(prefix=prefix[0], prefix_weights=prefix[1])
        choice = self.choice

        def work() -> tuple[np.ndarray, float]:
            t0 = time.perf_counter()
            traj = self.policy.sample(obs, choice.sampler, choice.num_inference_steps, **kwargs)
            return traj, time.perf_counter() - t0

        self._pending = (n, self.clock(), self._pool.submit(work))

    def _poll(self, n: int) -> None:
        if self._pending is None:
            return
        start, _, future = self._pending
        if self.delay is not None:  # virtual time: delivered exactly d ticks after the request
            if n >= start + self.delay:
                self._deliver(n, wait=True)
        elif future.done():
            self._deliver(n, wait=False)

    def _deliver(self, n: int, wait: bool, at_index: int | None = None) -> None:
        start, _, future = self._pending
        self._pending = None
        try:
            traj, latency = future.result() if wait else future.result(timeout=0)
        except DpkitError:
            raise
        except Exception as e:  # a failure in the worker reaches the caller, never silently
            raise DpkitError(f"sampling a chunk failed: {type(e).__name__}: {e}") from e
        self._recent.append(latency)
        self.stats.latencies_s.append(latency)
        self.stats.chunks += 1
        self._chunk = _Chunk(start, traj, self.policy.executed_actions(traj))
        # async: the new chunk's action 0 belongs to tick `start`; `n - start` ticks have passed since.
        self._index = at_index if at_index is not None else (0 if self.execution == "sync" else n - start)
        self.switched = True


# ---- the C++ controller -------------------------------------------------------------------------------


class CppRealTimeController:
    """The C++ `dpkit::RealTimeController` over a CppPolicy, with the reference's interface (`step`, `stats`,
    `switched`, `choice`, `expected_delay`, `close`, context manager) — the same rules, run in C++ (the
    worker thread and the whole tick in C++, the GIL released while a tick waits).

    The settings have the reference's meanings and ranges (`check_timing`): `delay=None` is the wall clock
    (passed to C++ as its -1), a fixed delay is in [0, n_action_steps], and -1 is refused in both.
    C++ fixes the batch at construction; here it is taken from the first observation (a batch-1
    controller checks the settings at once and is remade when the first step brings another batch).
    Chunk r samples with the C++ generator reseeded to `_core.RealTimeController.request_seed(seed, r)`,
    not numpy's: its actions equal the Python reference's run over a policy drawing that same noise.

    A shared robot computer: `worker_cpus` pins the worker thread (which computes the chunk when the policy
    has 1 thread) to those CPUs, `worker_priority` (1..99) runs it under SCHED_FIFO. What the OS refuses
    (no CAP_SYS_NICE, CPUs outside the affinity mask) is skipped, not an error; `worker_setup` says which.
    """

    def __init__(self, policy: Any, execution: str = "async-inpaint", delay: int | None = None, margin: int = 0,
                 blend: int = 0, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                 period: float = 0.1, batch: int | None = None, worker_cpus: Sequence[int] = (),
                 worker_priority: int = 0):
        from dpkit.runtime import _core

        if execution not in EXECUTIONS:
            raise DpkitError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        self.policy = policy
        self.execution = execution
        self.choice = policy.resolve_sampler(sampler, steps)
        check_timing(policy, delay, margin, blend, period)  # the reference's ranges, before any C++ cast
        if batch is not None:
            _int_in(batch, "batch", 1, int(policy.max_batch))
        seed = check_seed(seed)
        # delay None (measured on the wall clock) is C++'s -1; the Python API refuses -1 itself
        self._args = dict(execution=execution, delay=-1 if delay is None else delay, margin=margin, blend=blend,
                          sampler=self.choice.sampler, num_inference_steps=self.choice.num_inference_steps,
                          seed=seed, period=period, worker_cpus=_cpu_list(worker_cpus),
                          worker_priority=_int_in(worker_priority, "worker_priority", 0, 99))
        self._make = lambda b: _core.RealTimeController(policy._policy, batch=b, **self._args)
        self._ctl = self._make(1 if batch is None else batch)
        self._fixed_batch = batch is not None
        self._stepped = False

    def step(self, obs: dict[str, Any]) -> np.ndarray:
        """Feed this tick's observation {key: (B, ...)}; get this tick's action (B, A) at once."""
        if not self._stepped and not self._fixed_batch and isinstance(obs, dict) and obs:
            shape = np.shape(next(iter(obs.values())))
            b = int(shape[0]) if shape else 1
            if b != self._ctl.batch:
                self._ctl.close()
                self._ctl = self._make(b)
        self._stepped = True
        return self._ctl.step(obs)

    @property
    def stats(self) -> ControllerStats:
        s = self._ctl.stats
        return ControllerStats(s["ticks"], s["requests"], s["chunks"], s["deadline_misses"], s["wait_ticks"],
                               list(s["latencies_s"]))

    @property
    def switched(self) -> bool:
        return self._ctl.switched

    @property
    def worker_setup(self) -> str:
        """What worker_cpus / worker_priority did: applied, or refused and why ("" when neither was asked)."""
        return self._ctl.worker_setup

    def expected_delay(self) -> int:
        return self._ctl.expected_delay()

    def close(self) -> None:
        self._ctl.close()

    def __enter__(self) -> "CppRealTimeController":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_controller(policy: Any, **kwargs: Any) -> "RealTimeController | CppRealTimeController":
    """The real-time controller for `policy`: the C++ one for a "cpp" backend policy, else the Python
    reference. Keyword arguments are RealTimeController's (`clock`/`history` only for the reference)."""
    if getattr(policy, "backend", None) == "cpp" and "clock" not in kwargs and "history" not in kwargs:
        return CppRealTimeController(policy, **kwargs)
    return RealTimeController(policy, **kwargs)


def apply_worker_options(cpus: Sequence[int], priority: int) -> str:
    """Pin the calling thread to `cpus` and/or run it under SCHED_FIFO at `priority`, as the C++ controller
    does (same words): what the OS refuses is skipped and said, never raised."""
    notes = []
    tid = threading.get_native_id()
    listed = ",".join(str(c) for c in cpus)
    if cpus:
        try:
            os.sched_setaffinity(tid, cpus)
            notes.append(f"worker pinned to CPUs {listed}")
        except (OSError, ValueError) as e:
            notes.append(f"worker CPU affinity {{{listed}}} refused ({getattr(e, 'strerror', None) or e}: CPUs "
                         "outside this process's affinity mask?); the worker runs on any CPU")
    if priority:
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
            notes.append(f"worker at SCHED_FIFO priority {priority}")
        except (OSError, AttributeError) as e:
            notes.append(f"SCHED_FIFO priority {priority} refused ({getattr(e, 'strerror', None) or e}: needs "
                         "CAP_SYS_NICE or an RLIMIT_RTPRIO of at least the priority); normal scheduling")
    return "; ".join(notes)


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _cpu_list(cpus: Any) -> list[int]:
    """worker_cpus: CPU numbers (a list, or "0,1" as on a command line)."""
    if isinstance(cpus, str):
        cpus = [c for c in cpus.replace(",", " ").split()]
        if not all(c.isdigit() for c in cpus):
            raise InputError(f"worker_cpus must be CPU numbers, got {cpus!r}")
        cpus = [int(c) for c in cpus]
    return [_int_in(c, "worker_cpus entry", 0, 1023) for c in cpus]


def check_timing(policy: Any, delay: Any, margin: Any, blend: Any, period: Any) -> None:
    """The settings both controllers take, with one meaning and one range each: `delay` None (measured on the
    wall clock) or a fixed d in [0, n_action_steps] ticks; `margin` in [0, n_action_steps] ticks; `blend` in
    [0, 10**6] rows; `period` a positive number of seconds. C++'s ControllerParams spells "measured" as
    delay = -1 (an int has no None); the Python controllers refuse -1, so a Python delay is always a count."""
    ta = int(policy.n_action_steps)
    for name, value, hi, unit in (("delay", delay, ta, "ticks"), ("margin", margin, ta, "ticks"),
                                  ("blend", blend, 10**6, "rows")):
        if name == "delay" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= hi:
            hint = "; None: measured on the wall clock" if name == "delay" else ""
            raise InputError(f"{name} must be an integer in [0, {hi}] {unit} (n_action_steps = {ta}{hint}), "
                             f"got {value!r}")
    if isinstance(period, bool) or not isinstance(period, numbers.Real) or not (period > 0 and math.isfinite(period)):
        raise InputError(f"period must be a positive number of seconds, got {period!r}")
