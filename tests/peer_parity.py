"""The one parity rule for converted peer policies, on every backend (torch, ort, cpp) and every fixture.

    from peer_parity import Case, Float64Runs, check_case
    truth = Float64Runs(lambda name: runs[name])            # dpkit's own float64 run of each converted network
    check_case(policy, obs, case, truth.get(name, case, obs))    # asserts, returns the measured errors

A fixture holds the peer's float32 outputs, made on the CPU that made the fixture. Comparing dpkit's float32
run with them directly mixes two roundings, and one of them belongs to a CPU we do not have: float32
kernels differ by ulps between CPUs (instruction set, thread count) and DDIM's ten large steps amplify
them. A 1e-3 px bound on that difference passed on one AMD EPYC and failed on another (1.45e-3 px).
So each result is compared with the float64 run of dpkit's converted network, with the same injected
noise, which no CPU's rounding moves (the same figures to the last digit under ATEN_CPU_CAPABILITY=avx2
and default, 1 and 2 threads). Two rules, the same for torch, ort and cpp:

1. The conversion: the peer's own float32 result is within ACTION_TOL_PX (1e-3 px, the target) and
   TRAJ_TOL of dpkit's float64 run. The peer's result is a fixed file, so this holds or fails the same on
   every machine; a wrong translation is tens to hundreds of px off. (Measured 2026-12-04 on the six
   fixtures: 1.1e-4 to 2.3e-4 px DDPM-100, 3.3e-4 to 7.2e-4 px DDIM-10.)
2. dpkit's float32 rounding, on whatever CPU runs the test: dpkit's float32 result is within ROUNDING_FACTOR
   (2) times the peer's own float32 error (item 1: the size rounding reaches on this network and these
   draws) plus ROUNDING_MARGIN_PX of the float64 run. The margin is twice the largest excess over the
   peer's error measured with `python tests/peer_parity.py` on the 2-core AMD EPYC (AVX-512), torch
   kernels at ATEN_CPU_CAPABILITY=avx2 and default, 1 and 2 threads (ORT's kernels are picked by the CPU
   alone), on the fixtures of tests/data/peers:
       torch: DDPM-100 +2.1e-4 px, DDIM-10 +3.7e-4 px (original low-dim, AVX2 kernels);
       ort = cpp: DDPM-100 +8.2e-4 px, DDIM-10 +1.66e-3 px (the image fixtures, measured before the
       encoder's GroupNorms were exported in two-level form, export/exact_norm.py; after it, 2026-12-05:
       +4.6e-5 and +5.1e-4 px, the margins kept);
   another EPYC of this kind put torch DDIM-10 1.45e-3 px from a peer's float32 result (an excess of at
   most 1.45e-3 px). Hence 1.7e-3 px for DDPM-100 and 3.3e-3 px for DDIM-10, on every backend. The
   factor: the lerobot sweep's random image networks (tests/peers_sweep) amplify rounding far more, and
   there float32 runs that are all correct sit up to 2.9x lerobot's own float32 error from float64
   (spatial_softmax_num_keypoints_8 DDIM-10: lerobot 4.8e-3 px, ort/cpp 8.7e-3, torch with AVX2 kernels
   1.11e-2; normalization_visual_identity: lerobot 1.8e-3, ort/cpp 5.3e-3). A wrong translation is tens
   to hundreds of px off.

The rule's constants, Case, the float64 run and the per-case measurement live in dpkit.convert.check (imported
here), so that `dpkit-convert --check` applies the same rule; check_case below asserts it.

The peers' float32 runs each sit this far from float64 themselves, so a bound tighter than item 2 would
demand that dpkit round more accurately than the peer's own code does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# The rule itself lives in the package, so that dpkit-convert --check applies the same one.
from dpkit.convert.check import (ACTION_TOL_PX, ROUNDING_FACTOR, ROUNDING_MARGIN_PX, TRAJ_TOL, Case, ddpm_step_noise,  # noqa: F401
                                 float64_network, float64_trajectory, measure_case)


class Float64Runs:
    """dpkit's float64 run of each converted network (a float64 copy of the torch policy), computed once per
    (fixture, sampler) and kept."""

    def __init__(self, run_of: Callable[[str], object]):
        self._run_of = run_of
        self._networks: dict[str, object] = {}
        self._cache: dict[tuple[str, str, int], np.ndarray] = {}

    def network(self, name: str):
        """The converted DiffusionPolicy in float64, in inference mode."""
        if name not in self._networks:
            from dpkit.runtime import load_policy

            self._networks[name] = float64_network(load_policy(self._run_of(name), backend="torch").policy)
        return self._networks[name]

    def get(self, name: str, case: Case, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The float64 normalized trajectory (the backends' `sample` would round it to float32)."""
        key = (name, case.sampler, case.steps)
        if key not in self._cache:
            self._cache[key] = float64_trajectory(self.network(name), obs, case)
        return self._cache[key]


class LazyBundles:
    """`bundles[name]`: the converted run `runs[name]` exported (ddim-10 listed) on first use, then kept, so a
    module exports only the fixtures its selected tests ask for (`make test` skips the slow ones)."""

    def __init__(self, runs: dict, root):
        self._runs, self._root, self._out = runs, root, {}

    def __getitem__(self, name: str):
        if name not in self._out:
            from dpkit.export.writer import export_bundle

            export_bundle(self._runs[name], self._root / name, ddim_steps=(10,), data=str(self._root / "no_dataset"),
                          log=lambda _m: None)
            self._out[name] = self._root / name
        return self._out[name]


def check_case(policy, obs: dict[str, np.ndarray], case: Case, truth: np.ndarray) -> dict[str, float]:
    """Assert the module docstring's rule for one backend and sampler; returns the errors (px / normalized)."""
    m = measure_case(policy, obs, case, truth)
    d = {k: m[k] for k in ("peer_traj", "peer_px", "dpkit_traj", "dpkit_px")}
    assert m["conversion_ok"], (case.sampler, "conversion", d)
    assert m["rounding_ok"], (case.sampler, "float32 rounding", m["rounding_bound_px"], d)
    return d


def _measure() -> list[dict]:
    """Every fixture, backend and sampler: the errors check_case asserts on (the figures in the docstring)."""
    import lzma
    import tempfile
    from pathlib import Path

    import test_convert as tc
    import test_convert_lerobot_more as tm
    import test_convert_original_image as to
    from dpkit.convert.source import convert_policy
    from dpkit.export.writer import export_bundle
    from dpkit.runtime import load_policy

    tmp = Path(tempfile.mkdtemp(prefix="peer_parity_"))
    sources = {n: (tc.PEERS / n / f, tc._reference(n)) for n, f in tc.FIXTURES.items() if (tc.PEERS / n).is_dir()}
    for n in tm.FIXTURES:
        sources[n] = (tm._source(n, tmp / "src" / n), tm._reference(n))
    ckpt = tmp / "src" / "original_pusht_hybrid_tiny.ckpt"
    ckpt.write_bytes(lzma.decompress((to.FIXTURE / "latest.ckpt.xz").read_bytes()))
    hybrid = dict(np.load(to.FIXTURE / "reference.npz"))
    ddpm, ddim = to._cases(hybrid)
    sources["original_pusht_hybrid_tiny"] = (ckpt, {"obs": to._obs(hybrid), "ddpm": ddpm, "ddim": ddim})
    rows = []
    for name, (src, ref) in sources.items():
        run = Path(convert_policy(src, tmp / "runs" / name)["out"])
        bundle = tmp / "bundles" / name
        export_bundle(run, bundle, ddim_steps=(10,), data=str(tmp / "no_dataset"), log=lambda _m: None)
        truth = Float64Runs(lambda _n, run=run: run)
        for backend, path in (("torch", run), ("ort", bundle), ("cpp", bundle)):
            policy = load_policy(path, backend=backend)
            for sampler in ("ddpm", "ddim"):
                case = ref[sampler]
                d = check_case(policy, ref["obs"], case, truth.get(name, case, ref["obs"]))
                rows.append({"fixture": name, "backend": backend, "sampler": f"{sampler}-{case.steps}", **d,
                             "excess_px": d["dpkit_px"] - d["peer_px"]})
    return rows


if __name__ == "__main__":  # .venv/bin/python tests/peer_parity.py  (also under ATEN_CPU_CAPABILITY=avx2)
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    print(f"# torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    for row in _measure():
        print(json.dumps(row))
