"""The arguments every `dpkit-*` command shares, defined once: --threads, --no-progress (--quiet), --json,
--version, and the one spelling of a sampler and its step count K.

    from dpkit.cli_args import add_common_args, add_sampler_args, apply_threads, resolve_sampler_args
    p = argparse.ArgumentParser(prog="dpkit-eval")
    add_common_args(p, quiet_alias=True, json="write the report here")  # --threads N, --no-progress (= --quiet),
                                                                         # --json PATH, --version
    add_sampler_args(p, steps_alias=True)            # --sampler ddim | ddim-10, --num-steps K (= --steps)
    args = p.parse_args(argv)
    resolve_sampler_args(args)                       # args.sampler "ddim", args.num_steps 10 (label split)
    apply_threads(args)                              # --threads N reaches every library call of this command

The vocabulary, the same in every command:
  K                the denoising steps of one action chunk (one reverse pass): `--num-steps K`, or the label
                   `SAMPLER-K` (`ddim-10`, `ddpm-100`) wherever a sampler is named (`--sampler`, dpkit-bench
                   --samplers, train.eval_samplers); Python: `sample(obs, sampler, steps=K)`.
  --steps          kept as an old alias only: K in dpkit-eval (= --num-steps), SAMPLER-K labels in
                   dpkit-bench (= --samplers), optimizer steps in dpkit-train (= --train-steps).
  --train-steps    optimizer steps of a training run (dpkit-train).
  --no-progress    no progress bar (dpkit-eval also takes its older --quiet).
  --json PATH      also write the command's result JSON at PATH (atomically).

`--threads N` means what `threads=` means in Python (dpkit.threads): N intra-op threads for every backend
and for torch; 0 or absent: chosen for this machine and model. A bad value is one line on stderr and exit 1
(through dpkit.errors.cli_entry), like every other bad input.
"""

from __future__ import annotations

import argparse
import os

import dpkit
from dpkit.errors import DpkitError, InputError
from dpkit.sampling_args import SAMPLERS, parse_sampler_label
from dpkit.threads import parse_threads

THREADS_HELP = ("intra-op threads for torch and ONNX Runtime (default 0: chosen for the CPUs this process may use "
                "and the model's size; see dpkit.threads)")


def _threads(text: str) -> int:
    # A DpkitError is not one of the errors argparse turns into a usage message, so it reaches cli_entry as
    # one line; InputError (a ValueError) would be swallowed into argparse's "invalid value" text.
    try:
        return parse_threads(text, "--threads")
    except InputError as e:
        raise DpkitError(str(e)) from None


def add_common_args(p: argparse.ArgumentParser, *, progress: bool = True, quiet_alias: bool = False,
                    json: str | None = None) -> None:
    """--threads N, --version, (with `progress`) --no-progress, (with `json`, its help text) --json PATH;
    `quiet_alias` keeps an older --quiet."""
    p.add_argument("--threads", type=_threads, default=0, metavar="N", help=THREADS_HELP)
    p.add_argument("--version", action="version", version=f"%(prog)s {dpkit.__version__}")
    if progress:
        names = ["--no-progress", "--quiet"] if quiet_alias else ["--no-progress"]
        p.add_argument(*names, dest="no_progress", action="store_true",
                       help="no progress bar" + (" (--quiet: the older name)" if quiet_alias else ""))
    if json is not None:
        p.add_argument("--json", metavar="PATH", default=None, help=f"{json} (JSON, written atomically)")


def add_sampler_args(p: argparse.ArgumentParser, *, steps_alias: bool = False) -> None:
    """--sampler KIND or KIND-K and --num-steps K (with `steps_alias`, also the older --steps): the sampler of
    one action chunk and its denoising steps K. `resolve_sampler_args` splits a label and checks both."""
    p.add_argument("--sampler", metavar="SAMPLER[-K]",
                   help=f"{' | '.join(SAMPLERS)}, optionally with K as a label (ddim-10); default: the bundle's / "
                        "checkpoint's default sampler")
    names = ["--num-steps", "--steps"] if steps_alias else ["--num-steps"]
    p.add_argument(*names, dest="num_steps", type=int, default=None, metavar="K",
                   help="denoising steps K per action chunk for --sampler (default: the sampler's listed K)"
                        + (" (--steps: the older name)" if steps_alias else ""))


def resolve_sampler_args(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """(kind, K) from --sampler / --num-steps, stored back on `args` (`sampler`, `num_steps`): a label
    `ddim-10` is split; a K in both places must agree. Bad values: DpkitError (one line via cli_entry)."""
    sampler, k = args.sampler, args.num_steps
    if sampler is not None and sampler not in SAMPLERS:
        if "-" not in sampler and ":" not in sampler:
            raise DpkitError(f"unknown --sampler {sampler!r} (expected {' or '.join(SAMPLERS)}, or a label such as "
                             "ddim-10)")
        try:
            sampler, label_k = parse_sampler_label(sampler, "--sampler")
        except InputError as e:
            raise DpkitError(str(e)) from None
        if k is not None and k != label_k:
            raise DpkitError(f"--sampler {args.sampler} says K = {label_k} but --num-steps says {k}")
        k = label_k
    if k is not None and k < 1:
        raise DpkitError(f"--num-steps must be >= 1, got {k}")
    args.sampler, args.num_steps = sampler, k
    return sampler, k


def apply_threads(args: argparse.Namespace) -> int:
    """Pass an explicit --threads on as $DPKIT_THREADS, so every choice this command (and any process it
    starts) makes honours it; returns the request (0: none)."""
    n = int(getattr(args, "threads", 0) or 0)
    if n:
        os.environ["DPKIT_THREADS"] = str(n)
    return n
