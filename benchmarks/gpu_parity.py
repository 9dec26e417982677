"""The PyTorch policy on a GPU against the bundle on the CPU reference runtime, sample for sample.

    python -m dpkit.benchmarks.gpu_parity --models tiny pusht_lowdim pusht_image --json parity.json
    python -m dpkit.benchmarks.gpu_parity --device cpu --models tiny      # the same check, CPU only

For each model (random weights and bundles from dpkit-bench's cache: `benchmarks.models.prepare_model`) and
its few-step student, one batch of observations is sampled with every sampler from the same noise (`seed`
draws the initial and per-step noise alike on every Python backend) by three runtimes: the checkpoint in
PyTorch on `--device`, the checkpoint in PyTorch on the CPU, and the exported bundle in the "ort" runtime on
the CPU (the numpy reference loop). Reported per row: the largest absolute difference of the normalized
trajectories (B, H, A) between each pair, for the device with TF32 allowed (PyTorch's default for cuDNN
convolutions) and with it off. A row passes when the device is within `--tol` of the reference.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from dpkit.benchmarks.models import prepare_model, random_obs
from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, check_writable_file
from dpkit.sampling_args import parse_sampler_label

MODELS = ("tiny", "pusht_lowdim", "pusht_image")
SAMPLERS = ("ddpm-100", "ddim-10", "fewstep-1", "fewstep-2")


def _tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def check_model(name: str, samplers: list[tuple[str, int]], device: str, batch: int, cache_dir: Path,
                threads: int, log=print) -> list[dict[str, Any]]:
    """The rows of one model: its own samplers (ddpm, ddim) on the model, fewstep ones on its student."""
    from dpkit.runtime import load_policy

    rows = []
    for student in (False, True):
        mine = [(k, n) for k, n in samplers if (k == "fewstep") == student]
        if not mine:
            continue
        art = prepare_model(name, cache_dir, log, need_bundle=True, fewstep=student)
        if art.bundle is None:
            raise DpkitError(f"{name}{' few-step student' if student else ''}: no bundle ({art.bundle_error})")
        reference = load_policy(art.bundle, backend="ort", provider="cpu", threads=threads)
        on_cpu = load_policy(art.checkpoint, backend="torch", device="cpu", threads=threads)
        on_device = on_cpu if device == "cpu" else load_policy(art.checkpoint, backend="torch", device=device,
                                                               threads=threads)
        obs = random_obs(art, batch)
        for kind, k in mine:
            ref = np.asarray(reference.sample(obs, kind, k, seed=0), np.float64)
            cpu = np.asarray(on_cpu.sample(obs, kind, k, seed=0), np.float64)
            row = {"model": name, "student": student, "params": art.params, "sampler": f"{kind}-{k}",
                   "batch": batch, "device": device, "max_abs_cpu_vs_reference": float(np.abs(cpu - ref).max())}
            for tf32 in ((True, False) if device == "cuda" else (False,)):
                if device == "cuda":
                    _tf32(tf32)
                dev = np.asarray(on_device.sample(obs, kind, k, seed=0), np.float64)
                suffix = "_tf32" if tf32 else ""
                row[f"max_abs_device_vs_reference{suffix}"] = float(np.abs(dev - ref).max())
                row[f"max_abs_device_vs_cpu{suffix}"] = float(np.abs(dev - cpu).max())
            rows.append(row)
            log(f"[{name}{' student' if student else ''}] {kind}-{k}: device vs reference "
                f"{row['max_abs_device_vs_reference']:.2e}, cpu vs reference {row['max_abs_cpu_vs_reference']:.2e}")
    if device == "cuda":
        _tf32(True)
    return rows


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpkit.benchmarks.gpu_parity", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), metavar="SAMPLER-K")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where PyTorch runs (default cuda)")
    p.add_argument("--batch", type=int, default=4, help="observations per chunk batch (default 4)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest |device - reference| (normalized units, TF32 off) a row passes with (default 1e-4)")
    p.add_argument("--cache-dir", default=os.environ.get("DPKIT_BENCH_CACHE", "benchmarks/.cache"))
    add_common_args(p, progress=False, json="the rows and the machine")
    args = p.parse_args(argv)
    samplers = [parse_sampler_label(s, "--samplers entry") for s in args.samplers]
    if args.batch < 1:
        raise DpkitError(f"--batch must be at least 1, got {args.batch}")
    if args.json:
        check_writable_file(args.json)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DpkitError("--device cuda: torch.cuda.is_available() is False on this machine "
                         "(no GPU, or a CPU build of torch); --device cpu checks the CPU path alone")
    threads = apply_threads(args) or None
    rows = []
    for name in args.models:
        rows += check_model(name, samplers, args.device, args.batch, Path(args.cache_dir), threads)
    key = "max_abs_device_vs_reference"
    failed = [r for r in rows if r[key] > args.tol]
    result = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
              "torch": torch.__version__, "tol": args.tol, "rows": rows, "passed": not failed}
    if args.json:
        atomic_write_json(args.json, result)
    print(f"{len(rows) - len(failed)}/{len(rows)} rows within {args.tol:g} of the reference"
          + ("" if not failed else ": " + ", ".join(f"{r['model']} {r['sampler']} {r[key]:.1e}" for r in failed)))
    return 0 if not failed else 1


if __name__ == "__main__":
    main()
