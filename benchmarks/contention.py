"""Busy processes beside a measurement, as other programs on a shared machine are (`dpkit-bench --contention N`).

    from dpkit.benchmarks.contention import BusyProcesses
    with BusyProcesses(2) as busy:      # two single-threaded busy loops, started stopped
        quiet = measure()
        busy.run()                      # SIGCONT: now they compete for the CPUs
        loaded = measure()
        busy.pause()                    # SIGSTOP: quiet again

Each is a separate Python process in its own session (os.setsid): this kernel shares the CPU evenly
between sessions (CFS autogroups, `/proc/PID/autogroup`; `nice` orders only within one), so a child left in our session
would only compete inside it, which is not what another program does. Pausing and resuming them around
each row lets the quiet and the busy figure of one row be measured back to back in the same run. They
are bounded: each ends by itself after `max_seconds` even if the benchmark dies without stopping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from dpkit.errors import DpkitError

MAX_BUSY = 64
# A pure-Python spin: one core's worth of load, no memory traffic, ends by itself.
_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


class BusyProcesses:
    """`n` busy loops, each in its own session; created paused (SIGSTOP), `run()`/`pause()` switch them."""

    def __init__(self, n: int, max_seconds: float = 3600.0):
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_BUSY:
            raise DpkitError(f"--contention must be an integer in [0, {MAX_BUSY}], got {n!r}")
        self.n, self.max_seconds = n, max_seconds
        self.procs: list[subprocess.Popen] = []
        self.running = False

    def __enter__(self) -> "BusyProcesses":
        for _ in range(self.n):
            p = subprocess.Popen([sys.executable, "-c", _LOOP, str(self.max_seconds)], start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(p)
        self.running = True
        self.pause()
        return self

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, sig)

    def run(self) -> None:
        if self.running:
            return
        self._signal(signal.SIGCONT)
        self.running = True
        time.sleep(0.2)  # let the scheduler see them as runnable before the first timed call

    def pause(self) -> None:
        if not self.running:  # a second SIGSTOP reports no new stop: waiting for one would hang
            return
        self._signal(signal.SIGSTOP)
        for p in self.procs:  # a signal is delivered asynchronously: wait until each has really stopped
            if p.poll() is None:
                os.waitpid(p.pid, os.WUNTRACED)
        self.running = False

    def __exit__(self, *exc: Any) -> None:
        self._signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM until continued
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
