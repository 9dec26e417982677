"""Quiet-machine cost of not spinning: the C++ DDIM-10 chunk at batch 1 with 1/2 threads, spinning off/on.

    python -m dpkit.benchmarks.bench_spin BUNDLE [--rounds 3] [--chunks 15] [--json OUT]

The settings run in alternating rounds in one process (a drifting machine shifts them all alike); each round
times `--chunks` chunks per setting after one untimed chunk. dpkit.threads keeps spinning off because it
collapses beside another busy process (benchmarks/results/contention/); this measures what that costs
when nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from dpkit.benchmarks.machine import latency_stats
from dpkit.errors import cli_entry
from dpkit.runtime import load_policy
from dpkit.runtime.parity import random_observations


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", type=int, default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    settings = [(t, s) for t in (1, 2) for s in (False, True)]
    policies = {k: load_policy(args.bundle, backend="cpp", threads=k[0], allow_spinning=k[1]) for k in settings}
    first = policies[settings[0]]
    obs = random_observations(first.observations, first.n_obs_steps, 1, 0)
    times: dict[tuple[int, bool], list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for k, policy in policies.items():
            policy.sample(obs, sampler="ddim", steps=10, seed=0)
            for i in range(args.chunks):
                t0 = time.perf_counter()
                policy.sample(obs, sampler="ddim", steps=10, seed=i)
                times[k].append(time.perf_counter() - t0)
    rows = [{"threads": t, "spin": s, **latency_stats(np.asarray(times[(t, s)]))} for t, s in settings]
    for r in rows:
        print(f"threads={r['threads']} spin={str(r['spin']):5s}  " + "  ".join(
            f"{k} {v:.1f}" for k, v in r.items() if k.endswith("_ms")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle": args.bundle, "load_avg": [round(x, 2) for x in os.getloadavg()], "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
