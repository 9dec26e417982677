"""Export time and bundle sizes for the named configs (random weights; the graphs' size and cost do not
depend on training).

    .venv/bin/python benchmarks/bench_export.py                      # tiny, pusht_lowdim, pusht_image
    .venv/bin/python benchmarks/bench_export.py --configs tiny --out benchmarks/results/export.json

Each config gets a checkpoint written with the training stage's own `save_checkpoint` (normalizer fitted
on the real dataset when found, else on a small synthetic store), then the full `dpkit-export` path:
ONNX export, parity verification (dataset samples when available), bundle write.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # synthetic.py: the fallback dataset


def make_checkpoint(config: str, run_dir: Path, data: Path) -> Path:
    from dpkit.train.checkpoint import save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.data import load_datasets
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config(config, [f"data.path={data}"])
    train, _ = load_datasets(cfg)
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg.policy, train.fit_normalizer())
    save_checkpoint(run_dir, 0, model=policy, ema_model=policy,
                    state={"config": cfg.to_dict(), "normalizer": policy.normalizer.to_dict()})
    return run_dir


def main() -> None:
    from dpkit.errors import DpkitError
    from dpkit.export.writer import export_bundle
    from dpkit.io import atomic_write_json
    from dpkit.train.data import resolve_dataset_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="tiny,pusht_lowdim,pusht_image")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.json"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads that lose "
                        "their core to another process make small ops up to 100x slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            data, data_desc = resolve_dataset_path(None), "real PushT dataset"
        except DpkitError:
            from synthetic import make_synthetic_pusht

            data, data_desc = make_synthetic_pusht(tmp / "pusht.zarr", n_episodes=6), "synthetic store"
        for name in args.configs.split(","):
            print(f"== {name}", flush=True)
            run = make_checkpoint(name, tmp / f"run_{name}", data)
            s = export_bundle(run, tmp / f"bundle_{name}", data=str(data), ddim_steps=(10,))
            s.pop("bundle"), s.pop("checkpoint")
            results.append({"config": name, **s, "bundle_bytes": sum(s["sizes_bytes"].values())})
    report = {
        "load_average_at_end": list(os.getloadavg()),
        "what": "dpkit-export on random-weight checkpoints: wall seconds (total / ONNX export / verification) "
                "and bundle file sizes",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
        "torch": torch.__version__,
        "parity_inputs": data_desc,
        "results": results,
    }
    atomic_write_json(args.out, report)
    for r in results:
        print(f"{r['config']:<14} {r['parameters'] / 1e6:7.2f} M params  total {r['seconds']:6.1f} s  "
              f"export {r['export_fp32_s']:6.1f} s  verify {r['verify_fp32_s']:6.1f} s  "
              f"bundle {r['bundle_bytes'] / 1e6:8.2f} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
