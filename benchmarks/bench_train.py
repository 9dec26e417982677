"""Training throughput (samples/s) of each config, and of the data loader alone.

    .venv/bin/python benchmarks/bench_train.py                      # all configs, writes results JSON
    .venv/bin/python benchmarks/bench_train.py --configs tiny --steps 50 --threads 2
    .venv/bin/python benchmarks/bench_train.py --configs tiny --budget 8 --contention 1 --out /tmp/t.json

One timed step is what the trainer does per optimizer step: a batch from the DataLoader (the trainer's
sampler and collate), forward + backward, AdamW, the EMA update. The real dataset is used when found
(see dpkit.train.data.resolve_dataset_path), else a synthetic store. Each config runs `--steps` steps
or until `--budget` seconds pass (at least 2), after 1 warm-up step. Results go to
benchmarks/results/train_throughput.json with the machine's details, including its load average:
on a shared machine, other jobs slow every number here. Threads: dpkit's rule per config (dpkit.threads)
unless --threads. `--contention N` times each config again beside N busy processes (each in its own
session; dpkit.benchmarks.contention), right after its quiet figure, and reports busy / quiet.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import dpkit  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp; see dpkit.threads)
import numpy as np
import torch

from dpkit.benchmarks.contention import BusyProcesses
from dpkit.errors import DpkitError, cli_entry
from dpkit.threads import apply_torch, choose_threads
from dpkit.io import atomic_write_json
from dpkit.train.config import load_config
from dpkit.train.data import load_datasets, resolve_dataset_path, to_tensors
from dpkit.train.trainer import EMA, EpochBatches

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"


def _dataset_path(tmp: Path) -> tuple[str, str]:
    try:
        return str(resolve_dataset_path(None)), "real"
    except DpkitError:
        sys.path.insert(0, str(ROOT / "tests"))
        from synthetic import make_synthetic_pusht

        return str(make_synthetic_pusht(tmp / "pusht.zarr", n_episodes=12, lengths=[120] * 12)), "synthetic"


def _loader(ds, batch_size: int, seed: int = 0):
    sampler = EpochBatches(len(ds), batch_size, 0, 1, seed)
    return iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=to_tensors))


def bench_loader(ds, batch_size: int, seconds: float = 3.0) -> dict:
    it = _loader(ds, batch_size)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    return {"batch_size": batch_size, "batches": n, "samples_per_s": n * batch_size / dt}


def bench_config(name: str, data_path: str, steps: int, budget: float, batch: int | None, bf16: bool,
                 threads: int = 0, busy: BusyProcesses | None = None) -> dict:
    from dpkit.train.policy import DiffusionPolicy

    overrides = [f"data.path={data_path}"] + ([f"train.batch_size={batch}"] if batch else [])
    cfg = load_config(name, overrides)
    t = cfg.train
    train_ds, _ = load_datasets(cfg)
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg.policy, train_ds.fit_normalizer()).train()
    choice = choose_threads(threads, params=policy.num_parameters())
    apply_torch(choice)
    ema = EMA(policy, t.ema_power, t.ema_max_decay)
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    it = _loader(train_ds, t.batch_size)

    def step() -> float:
        # What accelerate's mixed_precision="bf16" does on CPU: autocast the forward pass.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = policy(next(it))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(policy)
        return float(loss.detach())

    def timed() -> tuple[list[float], list[float]]:
        times, losses = [], []
        t_start = time.perf_counter()
        while len(times) < steps and (len(times) < 2 or time.perf_counter() - t_start < budget):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        return times, losses

    step()  # warm-up
    times, losses = timed()
    total = sum(times)
    contended = None
    if busy is not None and busy.n:
        busy.run()
        try:
            busy_times, _ = timed()
        finally:
            busy.pause()
        rate = len(busy_times) * t.batch_size / sum(busy_times)
        contended = {"busy_processes": busy.n, "steps_timed": len(busy_times), "samples_per_s": rate,
                     "vs_quiet": rate / (len(times) * t.batch_size / total)}
    return {
        "threads": choice.to_json(),
        "contention": contended,
        "config": name,
        "obs_mode": cfg.policy.obs_mode,
        "parameters": policy.num_parameters(),
        "batch_size": t.batch_size,
        "mixed_precision": "bf16" if bf16 else "no",
        "steps_timed": len(times),
        "step_s_median": float(np.median(times)),
        "samples_per_s": len(times) * t.batch_size / total,
        "loader": bench_loader(train_ds, t.batch_size),
        "first_loss": losses[0],
    }


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "pusht_lowdim", "pusht_image"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per config (at most)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per config (at most)")
    p.add_argument("--batch", type=int, help="override every config's batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: dpkit.threads' choice)")
    p.add_argument("--contention", type=int, default=0, metavar="N",
                   help="also time each config beside N busy processes, each in its own session (default 0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp, BusyProcesses(args.contention) as busy:
        data_path, kind = _dataset_path(Path(tmp))
        for name in args.configs:
            r = bench_config(name, data_path, args.steps, args.budget, args.batch, args.bf16, args.threads, busy)
            results.append(r)
            print(
                f"{name:13s} {r['obs_mode']:6s} {r['mixed_precision']:4s} {r['parameters'] / 1e6:7.2f} M params  batch {r['batch_size']:3d}  "
                f"{r['samples_per_s']:8.1f} samples/s train ({r['step_s_median']:.3f} s/step, {r['steps_timed']} steps)  "
                f"loader alone {r['loader']['samples_per_s']:9.0f} samples/s; {r['threads']['threads']} threads"
            )
            if r["contention"]:
                c = r["contention"]
                print(f"{'':13s} beside {c['busy_processes']} busy: {c['samples_per_s']:8.1f} samples/s "
                      f"({100 * c['vs_quiet']:.0f} % of quiet, {c['steps_timed']} steps)")
    report = {
        "dataset": kind,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
