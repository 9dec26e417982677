"""`dpkit-convert`: a lerobot pretrained diffusion policy or an original diffusion_policy .ckpt -> dpkit run.

    dpkit-convert path/to/pretrained_model --out runs/lerobot_pusht      # lerobot save_pretrained folder
    dpkit-convert path/to/latest.ckpt --out runs/dp_lowdim [--no-ema]    # original diffusion_policy
    dpkit-convert lerobot/diffusion_pusht --out runs/lerobot_pusht [--revision REV]   # a hub repo id
    dpkit-export runs/lerobot_pusht --out bundles/lerobot_pusht

The run folder is what dpkit-train writes (checkpoint + resolved config + normalizer, plus where the
policy came from), so dpkit-export, dpkit-eval --checkpoint, dpkit-bench and load_policy(...,
backend="torch") use it unchanged. Nothing is written at --out unless the conversion succeeds.
    dpkit-convert path/to/pretrained_model --out runs/x --check auto    # or --check path/to/reference.npz
compares the converted policy's outputs with the peer's recorded ones first (dpkit.convert.check).
A hub repo id is fetched through huggingface_hub into its standard cache (HF_HUB_OFFLINE=1: the cache only);
a local path that exists wins over it (dpkit.convert.hub).
"""

from __future__ import annotations

import argparse
import json
import sys

from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import cli_entry
from dpkit.io import atomic_write_json, check_writable_file
from dpkit.threads import apply_torch, choose_threads


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpkit-convert", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="lerobot pretrained_model folder, a diffusion_policy .ckpt, or a Hugging Face "
                                  "hub repo id of a lerobot policy (lerobot/diffusion_pusht)")
    p.add_argument("--revision", default=None, help="hub repo id only: branch, tag or commit (default main)")
    p.add_argument("--out", required=True, help="dpkit run folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it is a dpkit run folder")
    p.add_argument("--no-ema", action="store_true", help="diffusion_policy: the trained weights, not the EMA copy")
    p.add_argument("--check", default=None, metavar="REFERENCE.npz|auto",
                   help="run the converted policy on a peer reference (observations, noise, the peer's outputs) "
                        "and refuse to write --out unless it matches (dpkit.convert.check); auto: the "
                        "reference.npz in the source folder or beside the .ckpt")
    add_common_args(p, json="also write a summary here")  # --threads, --no-progress, --json PATH, --version
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from dpkit.convert.hub import is_repo_id
    from dpkit.convert.source import convert_policy

    args = parser().parse_args(argv)
    apply_threads(args)
    if args.json:
        check_writable_file(args.json)
    hub = is_repo_id(args.source)  # fetched first: one more step
    with tqdm(total=3 if hub else 2, desc="dpkit-convert", disable=args.no_progress, file=sys.stderr,
              leave=False) as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg[-60:])
            bar.update(1)

        # Conversion is tensor copies and one parity run of a model whose size is not known before reading
        # it: the rule's choice for an unknown size (1 thread) unless --threads says otherwise.
        choice = choose_threads(args.threads)
        apply_torch(choice)
        summary = convert_policy(args.source, args.out, ema=not args.no_ema, force=args.force, progress=progress,
                                 revision=args.revision, download_progress=not args.no_progress, check=args.check)
    summary["threads"] = choice.to_json()
    src = summary["source"]
    where = f"{src['hub']['repo_id']}@{src['hub']['commit'][:12]}" if "hub" in src else src["path"]
    print(f"dpkit-convert: {src['format']} {where} -> {summary['out']} ({summary['obs_mode']}, "
          f"{src['weights']} weights, sha256 {src['sha256'][:12]}...)")
    if summary.get("check"):
        errs = "; ".join(f"{c['sampler']} {c['dpkit_px']:.2g} px (peer's own {c['peer_px']:.2g}) from the {c['exact']} run"
                         for c in summary["check"]["cases"])
        print(f"dpkit-convert: check passed against {summary['check']['reference']}: {errs}")
    if args.json:
        atomic_write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    main()
