"""dpkit-train: train a Diffusion Policy on the PushT demonstrations.

    dpkit-train --config tiny --train-steps 300 --out runs/tiny
    dpkit-train --out runs/tiny --resume --train-steps 600           # continue the same run
    dpkit-train --config pusht_image train.batch_size=32 policy.horizon=10
    torchrun --nproc_per_node 2 -m dpkit.train.cli --config tiny     # 2 processes (CPU: gloo)

`--train-steps` (older name `--steps`, still accepted) is the total number of optimizer steps (resumed
runs count from their checkpoint); the run folder (default runs/<config name>) receives checkpoints/, metrics.jsonl and train_summary.json.
`key=value` overrides any config field. With --resume the checkpoint's config is used and --train-steps,
--seed, --data and overrides apply on top of it. `--threads N` sets torch's threads (default: chosen for
the model's size and the usable CPUs, dpkit.threads); train_summary.json records the choice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpkit.cli_args import add_common_args, apply_threads
from dpkit.errors import DpkitError, cli_entry
from dpkit.io import atomic_write_json, check_writable_dir, check_writable_file
from dpkit.train.config import Config, load_config, parse_override


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpkit-train",
        description="Train a Diffusion Policy on the PushT demonstrations (see the module docstring for examples).",
    )
    p.add_argument("--config", help="named config (tiny, pusht_lowdim, pusht_lowdim_cpu, pusht_image) or a YAML path")
    p.add_argument("--data", help="dataset: .zarr folder, .zarr.zip, or a folder containing one")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--train-steps", "--steps", dest="steps", type=int, metavar="N",
                   help="total optimizer steps of the run (overrides train.steps; --steps: the older name). Not the "
                        "denoising steps K of sampling: those are train.eval_samplers labels such as ddim-10")
    p.add_argument("--seed", type=int, help="training seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in the run folder")
    p.add_argument("--force", action="store_true", help="wipe the run folder's checkpoints and metrics and start over")
    add_common_args(p, json="also write the training summary here")  # --threads, --no-progress, --json, --version
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    return p


def _with_overrides(cfg: Config, overrides: list[str]) -> Config:
    d = cfg.to_dict()
    for text in overrides:
        keys, value = parse_override(text)
        node = d
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise DpkitError(f"unknown config key {'.'.join(keys)!r}")
            node = node[k]
        node[keys[-1]] = value
    return Config.from_dict(d, text=True)  # the overrides are text (the checkpoint's values were checked as JSON)


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config to train and the run folder, from the command line (and the checkpoint on --resume)."""
    from dpkit.train import checkpoint as ckpt_io

    extra = list(args.overrides)
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    if args.resume and args.force:
        raise DpkitError("--resume and --force contradict each other")
    if args.resume:
        if args.out is None and args.config is None:
            raise DpkitError("--resume needs --out RUN_DIR (or --config NAME for runs/NAME)")
        run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        found = ckpt_io.check_run_dir(run_dir, resume=True, force=False)
        state = ckpt_io.read_state(found)  # its errors name the file
        try:
            cfg = Config.from_dict(state["config"])
        except DpkitError as e:
            raise DpkitError(f"cannot resume from {found}: {e}") from None
        cfg = _with_overrides(cfg, extra)
        ckpt_io.check_resume_config(found, state, cfg)
    else:
        if args.config is None:
            raise DpkitError("--config NAME|PATH is required (named configs: tiny, pusht_lowdim, pusht_lowdim_cpu, pusht_image)")
        cfg = load_config(args.config, extra)
        run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
        ckpt_io.check_run_dir(run_dir, resume=False, force=args.force)
    if args.data is not None:
        cfg.data.path = args.data
    return cfg, run_dir


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    # Everything that can be checked without torch or the data is checked first, so bad input fails fast:
    # the config (and on --resume the checkpoint's state.json), then the places this run will write.
    cfg, run_dir = resolve_config(args)
    return _run(args, cfg, run_dir, verb="trained")


def _run(args: argparse.Namespace, cfg: Config, run_dir: Path, verb: str) -> int:
    """Train (or distill) `cfg` into `run_dir` as the command line asks; print and write the summary."""
    check_writable_dir(run_dir, "run folder")
    if args.json:
        check_writable_file(args.json)
    from dpkit.train.trainer import format_protocol, format_under_training, train

    rollout_eval = None
    if cfg.train.eval_every > 0:
        # The CLI is where the stages meet: the trainer itself never imports the simulator.
        try:
            from dpkit.eval.evaluate import rollout_evaluator
        except ImportError as e:
            raise DpkitError(f"train.eval_every > 0 needs gym-pusht (pip install 'dpkit[eval]'): {e}") from None
        rollout_eval = rollout_evaluator(cfg)
    rollout_collect = None
    if cfg.distill.rollout_at:
        try:
            from dpkit.eval.evaluate import window_collector
        except ImportError as e:
            raise DpkitError(f"distill.rollout_at needs gym-pusht (pip install 'dpkit[eval]'): {e}") from None
        rollout_collect = window_collector(cfg)
    summary = train(cfg, run_dir, resume=args.resume, force=args.force, progress=not args.no_progress,
                    rollout_eval=rollout_eval, threads=args.threads, rollout_collect=rollout_collect)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if args.json:
            atomic_write_json(args.json, summary)
        loss = summary["final_loss"]
        print(
            f"{verb} {summary['steps']} steps: loss {loss:.4f}" if loss is not None else f"at step {summary['steps']}",
            f"val {summary['val_loss']:.4f}" if summary["val_loss"] is not None else "",
            f"{summary['samples_per_s']:.0f} samples/s" if summary["samples_per_s"] else "",
            f"-> {summary['checkpoint']}",
        )
        for line in format_protocol(summary["protocol"]) + format_under_training(summary):
            print(line)
    return 0


if __name__ == "__main__":
    main()


DISTILL_RECIPE = "pusht_lowdim_cpu_distill"


def build_distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpkit-distill",
        description="Distill a dpkit policy (a trained or converted run folder) into a few-step student that samples "
                    "a chunk in 1-2 network calls (dpkit.train.distill). The student is a run folder like any "
                    "other: dpkit-export makes it a bundle with fewstep-1/fewstep-2 samplers.",
    )
    p.add_argument("teacher", nargs="?", help="the teacher: a dpkit run folder or checkpoint (not needed with --resume)")
    p.add_argument("--out", required=True, help="the student's run folder")
    p.add_argument("--config", default=DISTILL_RECIPE,
                   help=f"distillation recipe: its train and distill sections (default {DISTILL_RECIPE}); the "
                        f"policy and data are the teacher's")
    p.add_argument("--data", help="dataset (default: the one the teacher trained on, if it still exists)")
    p.add_argument("--train-steps", "--steps", dest="steps", type=int, metavar="N",
                   help="total optimizer steps of the distillation (overrides train.steps)")
    p.add_argument("--seed", type=int, help="seed (overrides train.seed)")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="wipe --out's checkpoints and metrics and start over")
    add_common_args(p, json="also write the distillation summary here")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. distill.timesteps=[99] train.lr=1e-4")
    return p


def resolve_distill_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The student's config (recipe + teacher) and run folder; every check that needs no torch or data."""
    from dpkit.train import checkpoint as ckpt_io
    from dpkit.train.distill import check_student, student_config, teacher_checkpoint

    run_dir = Path(args.out)
    if args.resume:
        if args.force:
            raise DpkitError("--resume and --force contradict each other")
        args.config = None
        cfg, run_dir = resolve_config(args)
        if cfg.distill.teacher is None:
            raise DpkitError(f"{run_dir} is not a distillation run (its config has no distill.teacher); "
                             f"continue it with dpkit-train --resume")
        if args.teacher is not None and Path(args.teacher).resolve() != Path(cfg.distill.teacher).resolve():
            raise DpkitError(f"--resume: {run_dir} distills {cfg.distill.teacher}, not {args.teacher}")
        return cfg, run_dir
    if args.teacher is None:
        raise DpkitError("give the teacher's run folder (dpkit-distill TEACHER --out STUDENT)")
    ckpt = teacher_checkpoint(args.teacher)
    state = ckpt_io.read_state(ckpt)
    try:
        teacher_cfg = Config.from_dict(state["config"])
    except DpkitError as e:
        raise DpkitError(f"teacher {args.teacher}: {e}") from None
    extra = [o for o in args.overrides if not o.startswith("policy.")]
    policy_overrides = [o for o in args.overrides if o.startswith("policy.")]
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    if args.seed is not None:
        extra.append(f"train.seed={args.seed}")
    recipe = load_config(args.config, extra)
    recipe.distill.teacher = str(Path(args.teacher).resolve())
    cfg = _with_overrides(student_config(recipe, teacher_cfg), policy_overrides)
    check_student(cfg.policy, teacher_cfg.policy)  # a policy.* override may only touch the student's own fields
    data_path = args.data or state.get("data_path")
    if args.data is not None or (data_path and Path(data_path).exists()):
        cfg.data.path = data_path
    ckpt_io.check_run_dir(run_dir, resume=False, force=args.force)
    return cfg, run_dir


@cli_entry
def distill_main(argv: list[str] | None = None) -> int:
    args = build_distill_parser().parse_intermixed_args(argv)
    apply_threads(args)
    cfg, run_dir = resolve_distill_config(args)
    return _run(args, cfg, run_dir, verb="distilled")
