"""The training loop: accelerate (devices, mixed precision, accumulation, multi-process), AdamW, cosine
LR with warm-up, EMA, validation loss, checkpoints, exact resume.

    from dpkit.train.config import load_config
    from dpkit.train.trainer import train
    summary = train(load_config("tiny", ["train.steps=300"]), "runs/tiny")

Exact resume: the data order is a pure function of (seed, epoch) and the random draws of each
micro-batch (diffusion noise and timesteps, crops) come from generators reseeded from
(seed, process rank, micro-batch number). So "where we are" is fully described by the step counter
saved in the checkpoint, on every process, without gathering generator states across processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import dpkit
from dpkit.errors import DpkitError
from dpkit.io import atomic_write_json, atomic_write_text, check_writable_dir, folder_lock
from dpkit.threads import apply_torch, choose_threads, describe, load_average, usable_cpus
from dpkit.train import checkpoint as ckpt_io
from dpkit.train.config import Config, TrainConfig
from dpkit.train.data import PushTDataset, fit_normalizer, load_datasets, to_tensors

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


class EMA:
    """Exponential moving average of a model's weights with the warm-up of the paper's EMAModel:
    decay after k updates = min(max_decay, 1 - (1 + k)^-power), 0 for the first update (a copy).
    Buffers (e.g. the normalizer's statistics) are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay
        self.updates = 0

    def decay(self) -> float:
        if self.updates == 0:
            return 0.0
        return min(self.max_decay, 1.0 - (1.0 + self.updates) ** -self.power)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.decay()
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), weight)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1


class EpochBatches(torch.utils.data.Sampler):
    """Endless batches of window indices for one process, starting at global batch `start`.

    Epoch e visits a permutation seeded by (seed, e); each global batch of batch_size * world windows
    is split between the processes; the incomplete tail of an epoch is dropped so all processes
    take the same number of steps. Batch b of the run is therefore the same whenever it is drawn.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise DpkitError(
                f"the training split has {n} windows, fewer than one batch (batch_size {batch_size} x {world} processes)"
            )

    def __iter__(self) -> Iterator[np.ndarray]:
        b = self.start
        epoch, perm = -1, None
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            first = (k * self.world + self.rank) * self.batch_size
            yield perm[first : first + self.batch_size]
            b += 1


def seed_everything(seed: int) -> None:
    """Seed random, numpy's global generator and torch (every device), as accelerate's set_seed does.

        seed_everything(42)   # the same draws as accelerate.utils.set_seed(42)

    numpy's legacy seeding takes only [0, 2**32), so a larger seed (up to dpkit.sampling_args.MAX_SEED) goes
    in as its two 32-bit words; a smaller one is passed as it is, so existing runs keep their initial weights.
    """
    random.seed(seed)
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)  # also seeds every CUDA device


def _seed_micro(seed: int, rank: int, micro: int) -> None:
    s = int(np.random.SeedSequence([seed, rank, micro]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def validation_loss(policy: torch.nn.Module, ds: PushTDataset, batch_size: int, n_batches: int, seed: int, device,
                    prepare: Callable[[Any], Any] | None = None) -> float | None:
    """Mean diffusion loss over the first `n_batches` batches of a fixed shuffle of `ds` (None if empty).
    `prepare(batch)` (distillation: the teacher's targets) turns each batch into what the policy's loss takes.

    Seeded, so successive validations of one run compare the same windows, noise and timesteps."""
    if len(ds) == 0:
        return None
    order = np.random.default_rng([seed, 1]).permutation(len(ds))
    was_training = policy.training
    policy.eval()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for i in range(n_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        if len(idx) == 0:
            break
        batch = _to_device(to_tensors(ds.__getitems__(idx)), device)
        if prepare is not None:
            batch = prepare(batch)
        total += float(policy(batch)) * len(idx)
        count += len(idx)
    policy.train(was_training)
    return total / count


def _score_rollouts(rollout_eval: Callable[[Any], Any], policy: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """{sampler label: {"score", "success_rate"}} from the evaluator (a bare float counts as "default")."""
    was_training = policy.training
    policy.eval()
    try:
        result = rollout_eval(policy)
    finally:
        policy.train(was_training)
    if not isinstance(result, dict):
        result = {"default": {"score": result}}
    out = {}
    for label, report in result.items():
        score = float(report["score"])
        if not math.isfinite(score):
            raise DpkitError(f"rollout evaluation ({label}) returned a non-finite score {score}")
        rate = report.get("success_rate")
        out[str(label)] = {"score": score, "success_rate": float(rate) if rate is not None else None}
    if not out:
        raise DpkitError("rollout evaluation returned no result")
    return out


def protocol_summary(evaluations: list[dict[str, Any]], last: int, episodes: int | None = None) -> dict[str, Any] | None:
    """The paper's numbers from a run's rollout evaluations: per sampler, the max and the mean of the
    scores (and success rates) of the last `last` evaluated checkpoints. `evaluations` holds
    {"step", "samplers": {label: {"score", "success_rate"}}} in step order. None when there are none."""
    if not evaluations:
        return None
    tail = evaluations[-last:]
    per_sampler = {}
    for label in tail[-1]["samplers"]:
        rows = [(e["step"], e["samplers"][label]) for e in tail if label in e["samplers"]]
        scores = [r["score"] for _, r in rows]
        rates = [r["success_rate"] for _, r in rows if r.get("success_rate") is not None]
        per_sampler[label] = {
            "max": max(scores),
            "mean": float(np.mean(scores)),
            "success_rate_max": max(rates) if rates else None,
            "success_rate_mean": float(np.mean(rates)) if rates else None,
            "steps": [step for step, _ in rows],
            "scores": scores,
            "success_rates": [r.get("success_rate") for _, r in rows],
        }
    return {
        "last": last,
        "evaluated": len(evaluations),
        "counted": len(tail),
        "complete": len(tail) == last,
        "episodes": episodes,
        "samplers": per_sampler,
    }


def format_protocol(protocol: dict[str, Any] | None) -> list[str]:
    """The CLI's closing lines for a protocol summary (one per sampler)."""
    if protocol is None:
        return []
    head = (f"last {protocol['counted']} of {protocol['evaluated']} evaluations"
            + (f" x {protocol['episodes']} episodes" if protocol.get("episodes") else ""))
    if not protocol["complete"]:
        head += f" (fewer than train.eval_last={protocol['last']})"
    lines = []
    for label, r in protocol["samplers"].items():
        rate = (f"; success max {r['success_rate_max']:.2f} mean {r['success_rate_mean']:.2f}"
                if r["success_rate_mean"] is not None else "")
        lines.append(f"{label}: score max {r['max']:.3f} mean {r['mean']:.3f}{rate} ({head})")
    return lines


def format_under_training(summary: dict[str, Any]) -> list[str]:
    """The CLI's (and the demo report's) warning when train.time_limit_s ended the run before its steps."""
    if not summary.get("stopped_by_time_limit"):
        return []
    steps, target = summary["steps"], summary.get("target_steps") or summary["steps"]
    return [f"WARNING: train.time_limit_s={summary.get('time_limit_s')} stopped training at step {steps} of "
            f"{target} ({100 * steps / max(target, 1):.0f} %): the policy is under-trained, and scores measured "
            f"with it are not representative (continue with --resume, or train without a time limit)"]


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _out_of_time(acc, start: float, limit_s: float) -> bool:
    """Rank 0's clock decides, so every process stops after the same step."""
    over = torch.tensor([time.perf_counter() - start >= limit_s], dtype=torch.int32, device=acc.device)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        over = broadcast(over, from_process=0)
    return bool(over.item())


def _record_step(line: str) -> float:
    """A metrics line's step; a blank or half-written line (a crash mid-write) sorts after everything."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class _Metrics:
    """metrics.jsonl (+ TensorBoard when installed); only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Drop records past the checkpoint (a run that died after it) so the file reads as one run.
            keep = [l for l in self.path.read_text().splitlines() if _record_step(l) <= resume_step]
            atomic_write_text(self.path, "".join(l + "\n" for l in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    rollout_eval: Callable[[Any], float] | None = None,
    threads: int | None = None,
    rollout_collect: Callable[[Any, int], Any] | None = None,
) -> dict[str, Any]:
    """Train `cfg` into `run_dir` (checkpoints/, metrics.jsonl, train_summary.json); return the summary.

    Runs in every process of a `torchrun` launch; only the main process writes files. `stop_after`
    ends the run early at that step with a checkpoint, as an interruption would (the LR schedule still
    spans `cfg.train.steps`), so a later `resume=True` continues it.

    `rollout_eval(policy) -> {sampler label: {"score", "success_rate"}}` (or a bare score) scores the EMA
    policy every `train.eval_every` steps from `train.eval_start` on; the summary's `protocol` is the
    paper's max/mean over the last `train.eval_last` of them (the trainer does not know the simulator:
    `dpkit-train` passes `dpkit.eval.evaluate.rollout_evaluator(cfg)`). Likewise `rollout_collect(policy, r)
    -> ({name: windows}, report)` runs distillation's rollout round r (`distill.rollout_at`; dpkit-distill
    passes `dpkit.eval.evaluate.window_collector(cfg)`).

    With `distill.teacher` set this is distillation into a few-step student (dpkit.train.distill): the
    batches become the teacher's targets and the student starts from the teacher's weights; nothing else
    about the loop changes.

    `threads`: torch's intra-op threads per process (None or 0: dpkit.threads' choice for the model's size
    and this process's share of the usable CPUs); the summary's "threads" records the choice.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg.validate()  # a config built or edited in Python gets the same checks as a YAML one
    t = cfg.train
    run_dir = Path(run_dir)
    if t.eval_every > 0 and rollout_eval is None:
        raise DpkitError("train.eval_every > 0 needs a rollout evaluator (dpkit-train passes the gym-pusht one; "
                         "from Python: train(..., rollout_eval=dpkit.eval.evaluate.rollout_evaluator(cfg)))")
    if cfg.distill.rollout_at and cfg.distill.teacher is None:
        raise DpkitError("distill.rollout_at is for distillation (dpkit-distill); this config has no distill.teacher")
    if cfg.distill.rollout_at and rollout_collect is None:
        raise DpkitError("distill.rollout_at needs a rollout collector (dpkit-distill passes the gym-pusht one; from "
                         "Python: train(..., rollout_collect=dpkit.eval.evaluate.window_collector(cfg)))")
    # Before any slow work: the run folder must be writable (a read-only mount or a path below a file
    # would otherwise surface only at the first write, after the data has loaded).
    check_writable_dir(run_dir, "run folder")

    acc = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        # accelerate only sets up a multi-process CPU run (gloo, under torchrun) when told cpu=True.
        cpu=not _has_accelerator(),
    )
    try:
        # One writer per run folder (the main process, which alone writes): a second dpkit-train (--resume or
        # not) is refused here, before its data loads, naming the holder's pid.
        with folder_lock(run_dir, "run folder") if acc.is_main_process else contextlib.nullcontext():
            resume_from = ckpt_io.check_run_dir(run_dir, resume, force)
            end = t.steps if stop_after is None else min(stop_after, t.steps)
            return _train(cfg, run_dir, acc, resume_from, progress, end, replace=force and resume_from is None,
                          rollout_eval=rollout_eval, threads=threads, rollout_collect=rollout_collect)
    finally:
        acc.end_training()
        # Let a later train() in the same process build an Accelerator with other settings.
        AcceleratorState._reset_state()


def _clear_run(run_dir: Path) -> None:
    """--force: remove an earlier run's outputs (only once the new run's inputs have loaded)."""
    for p in (ckpt_io.checkpoints_dir(run_dir), run_dir / METRICS, run_dir / SUMMARY, run_dir / "tensorboard"):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _train(cfg: Config, run_dir: Path, acc, resume_from: Path | None, progress: bool, end: int,
           replace: bool = False, rollout_eval: Callable[[Any], float] | None = None,
           threads: int | None = None, rollout_collect: Callable[[Any, int], Any] | None = None) -> dict[str, Any]:
    """The run: set-up, then one loop iteration per optimizer step, then the summary.

    Each step, in order: the micro-batches' forward and backward (the optimizer steps on the last), the LR
    schedule, the EMA, a distillation rollout round (distill.rollout_at), the time limit, a metrics record
    (with the validation loss on validation steps), a rollout evaluation and a checkpoint."""
    from tqdm.auto import tqdm

    from dpkit.train.normalizer import Normalizer

    t = cfg.train
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    state = _resume_state(resume_from, cfg, world, main)  # None for a new run
    teacher = _load_teacher(cfg, state, acc.device)  # None unless distilling

    # A resumed run rebuilds everything from its checkpoint (normalizer, weights, optimizer) before the
    # data loads, so a damaged or mismatched checkpoint fails in seconds, not after the data.
    if state is not None:
        normalizer = Normalizer.from_dict(state["normalizer"])
        policy, ema, optimizer, scheduler = _build(cfg, normalizer, acc.device, teacher, resume_from, state)
        if teacher is not None:  # the rollout windows and fixed draws' targets so far: the resumed run sees the same
            saved = ckpt_io.read_trainer_state(resume_from)
            teacher.load_rollouts(saved.get("rollout_windows"))
            if teacher.draws:
                teacher.load_cache(saved.get("teacher_cache"))
    train_ds, val_ds = load_datasets(cfg)  # a bad --data fails here, before --force removes anything
    if replace and main:
        _clear_run(run_dir)
    acc.wait_for_everyone()
    if state is None:
        normalizer = _new_normalizer(cfg, train_ds, teacher)
        policy, ema, optimizer, scheduler = _build(cfg, normalizer, acc.device, teacher, None, None)
    step = first_step = int(state["step"]) if state is not None else 0
    # CPU time of the steps before this run's (None: resumed from a checkpoint written before it was kept)
    cpu_before = state.get("cpu_s_total") if state is not None else 0.0
    thread_choice = _apply_threads(threads, policy)
    model, optimizer = acc.prepare(policy, optimizer)
    unwrapped = acc.unwrap_model(model)
    if teacher is not None:  # later_inputs "student" reads the student's own few-step states
        teacher.attach_student(unwrapped)
    eval_policy = ema.module if ema is not None else unwrapped  # validation and rollouts score the EMA
    loader = _data_loader(cfg, train_ds, acc, first_step)
    per_epoch = loader.batch_sampler.per_epoch
    metrics = _Metrics(run_dir, main, resume_step=step if state is not None else None)
    evaluations = _Evaluations(state)
    rollouts: list[dict[str, Any]] = list(state.get("rollouts", [])) if state is not None else []
    if main:
        _print_header(cfg, acc, teacher, unwrapped, train_ds, val_ds, step, thread_choice)

    model.train()
    data_iter = iter(loader)
    bar = tqdm(total=t.steps, initial=step, disable=not (main and progress), dynamic_ncols=True, mininterval=0.5)
    samples_per_step = t.batch_size * world * t.grad_accum_steps
    window = _Window(acc.device)
    last_loss = val_loss = None
    stopped_early = False
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while step < end:
        # batch, forward, backward: grad_accum_steps micro-batches; accelerate steps the optimizer on the last.
        step_loss = torch.zeros((), device=acc.device)
        for micro in range(step * t.grad_accum_steps, (step + 1) * t.grad_accum_steps):
            batch = _micro_batch(next(data_iter), acc.device, t.seed, rank, micro, teacher,
                                 energy=teacher is not None and step >= cfg.distill.energy_from,
                                 on_student=teacher is not None and step >= cfg.distill.later_inputs_from)
            with acc.accumulate(model):
                loss = model(batch)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / t.grad_accum_steps
        if not acc.sync_gradients:  # cannot happen with the counter aligned; guards a silent no-op step
            raise RuntimeError("gradient accumulation out of step with the optimizer")
        scheduler.step()
        if ema is not None:
            ema.update(unwrapped)
        step += 1
        window.add(step_loss)
        epoch = (step * t.grad_accum_steps) // per_epoch
        if teacher is not None and step in cfg.distill.rollout_at:  # every process: each needs the windows
            t0 = time.perf_counter()
            rollouts.append(_rollout_round(rollout_collect, eval_policy, teacher, cfg.distill.rollout_at.index(step),
                                           step, metrics if main else None))
            window.exclude(time.perf_counter() - t0)

        # Time limit, decided before the rest so this step is logged, validated and checkpointed as the last.
        if t.time_limit_s > 0 and step < end and _out_of_time(acc, wall0, t.time_limit_s):
            end = step  # --resume continues
            stopped_early = True

        # Log every log_every steps and at every validation step (val_every need not be a multiple).
        validate_now = step % t.val_every == 0 or step == end
        if step % t.log_every == 0 or validate_now:
            lr = scheduler.get_last_lr()[0]
            record = window.record(acc, step, epoch, lr, samples_per_step)
            last_loss = record["loss"]
            if validate_now:
                val_loss = _validate(acc, eval_policy, val_ds, t, teacher)
                if val_loss is not None:
                    record["val_loss"] = val_loss
            metrics.log(record)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            window.restart()
        bar.update(1)

        # Rollout evaluation, then a checkpoint (which records the score; the best one is kept apart).
        evaluate_now = t.eval_every > 0 and step % t.eval_every == 0 and step >= t.eval_start
        if step % t.checkpoint_every == 0 or step == end or evaluate_now:
            t0 = time.perf_counter()
            if main:
                score = best = None
                if evaluate_now:
                    score, best = evaluations.run(rollout_eval, eval_policy, step, metrics)
                saved = _save_checkpoint(run_dir, cfg, step, unwrapped, ema, optimizer, scheduler, normalizer,
                                         epoch=epoch, world=world, data_path=train_ds.replay.path,
                                         evaluations=evaluations, teacher=teacher, rollouts=rollouts,
                                         metrics={"loss": last_loss, "val_loss": val_loss, "score": score},
                                         cpu_s_total=_cpu_total(cpu_before, time.process_time() - cpu0))
                if best:
                    ckpt_io.copy_checkpoint(saved, run_dir, ckpt_io.BEST)
            acc.wait_for_everyone()
            window.exclude(time.perf_counter() - t0)  # checkpoint/eval time is not training throughput
    bar.close()
    metrics.close()

    summary = _summary(cfg, run_dir, acc, step=step, steps_this_run=step - first_step, stopped_early=stopped_early,
                       last_loss=last_loss, val_loss=val_loss, evaluations=evaluations,
                       samples=(step - first_step) * samples_per_step, train_time=window.train_time,
                       wall=time.perf_counter() - wall0, cpu0=cpu0, cpu_before=cpu_before,
                       thread_choice=thread_choice, teacher=teacher, rollouts=rollouts)
    if main:
        atomic_write_json(run_dir / SUMMARY, summary)
    acc.wait_for_everyone()
    return summary


# _train's steps, in the order it takes them.


def _resume_state(resume_from: Path | None, cfg: Config, world: int, main: bool) -> dict[str, Any] | None:
    """The checkpoint's state.json, checked against `cfg`, when resuming; None for a new run."""
    if resume_from is None:
        return None
    state = ckpt_io.read_state(resume_from)
    ckpt_io.check_resume_config(resume_from, state, cfg)
    if state.get("world_size", world) != world and main:
        print(f"note: resuming a {state['world_size']}-process run with {world} processes; data order will differ")
    return state


def _load_teacher(cfg: Config, state: dict[str, Any] | None, device: torch.device):
    """Distillation's frozen teacher, which makes each batch's targets (None without `distill.teacher`).
    A resumed run must distill the same teacher checkpoint as before."""
    if cfg.distill.teacher is None:
        return None
    from dpkit.train.distill import Teacher, check_student

    teacher = Teacher(cfg.distill.teacher, cfg.distill, device, seed=cfg.train.seed)
    check_student(cfg.policy, teacher.policy.cfg)
    was = (state or {}).get("teacher")
    if was is not None and (was.get("checkpoint"), was.get("step")) != (str(teacher.checkpoint), teacher.step):
        raise DpkitError(f"cannot resume: this run distills {was.get('checkpoint')} (step {was.get('step')}), "
                         f"but distill.teacher now names {teacher.checkpoint} (step {teacher.step})")
    return teacher


def _new_normalizer(cfg: Config, train_ds: PushTDataset, teacher):
    """A new run's normalizer: fitted to the training split, or (a student) exactly its teacher's, since the
    targets are in the teacher's units."""
    if teacher is None:
        return fit_normalizer(cfg, train_ds)
    from dpkit.train.normalizer import Normalizer

    return Normalizer.from_dict(teacher.policy.normalizer.to_dict())


def _build(cfg: Config, normalizer, device: torch.device, teacher, resume_from: Path | None,
           state: dict[str, Any] | None):
    """(policy, ema or None, optimizer, LR scheduler): seeded so every process starts from identical weights;
    a student starts as its teacher's network; a resumed run loads all four from `resume_from`."""
    from diffusers.optimization import get_scheduler

    from dpkit.train.policy import DiffusionPolicy

    t = cfg.train
    seed_everything(t.seed)  # identical initial weights on every process
    # On the device before the EMA copy and the optimizer, so both (and loaded optimizer state) live there.
    policy = DiffusionPolicy(cfg.policy, normalizer).to(device)
    if teacher is not None and state is None:  # a student starts as its teacher's network
        policy.load_state_dict(teacher.policy.state_dict())
    ema = EMA(policy, t.ema_power, t.ema_max_decay) if t.ema else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    # diffusers' "constant" ignores the warm-up; "constant_with_warmup" is what train.lr_scheduler means.
    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.steps)
    if state is not None:
        ckpt_io.load_weights_into(policy, resume_from, "model")
        if ema is not None:
            ckpt_io.load_weights_into(ema.module, resume_from, "ema")
            ema.updates = int(state.get("ema_updates", state["step"]))
        ckpt_io.load_trainer_state(resume_from, state, optimizer, scheduler)
    return policy, ema, optimizer, scheduler


def _apply_threads(threads: int | None, policy: torch.nn.Module):
    """Set (and return) torch's intra-op threads for this process; the processes of one launch on this
    machine share its CPUs (torchrun sets LOCAL_WORLD_SIZE)."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    choice = choose_threads(threads, params=sum(p.numel() for p in policy.parameters()),
                            cpus=max(1, usable_cpus() // local))
    apply_torch(choice)
    return choice


def _data_loader(cfg: Config, train_ds: PushTDataset, acc, step: int) -> torch.utils.data.DataLoader:
    """This process's endless training batches (EpochBatches), from the first micro-batch of `step` on."""
    t = cfg.train
    sampler = EpochBatches(len(train_ds), t.batch_size, acc.process_index, acc.num_processes, t.seed,
                           start=step * t.grad_accum_steps)
    return torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=sampler,
        collate_fn=to_tensors,
        num_workers=cfg.data.num_workers,
        pin_memory=acc.device.type == "cuda",
    )


def _print_header(cfg: Config, acc, teacher, policy: torch.nn.Module, train_ds: PushTDataset, val_ds: PushTDataset,
                  step: int, thread_choice) -> None:
    n_params = sum(p.numel() for p in policy.parameters())
    print(
        f"{'dpkit-distill' if teacher is not None else 'dpkit-train'}: {cfg.name} ({cfg.policy.obs_mode}, {n_params / 1e6:.2f} M parameters) on "
        f"{acc.device} x{acc.num_processes}; {len(train_ds)} train / {len(val_ds)} val windows from "
        f"{train_ds.replay.path}; steps {step} -> {cfg.train.steps}"
    )
    print(f"threads: {describe(thread_choice)}")


def _micro_batch(batch: Any, device: torch.device, seed: int, rank: int, micro: int, teacher,
                 energy: bool = False, on_student: bool = False) -> Any:
    """Micro-batch number `micro` of the run, on the device, with this process's generators reseeded for it
    (the diffusion noise and timesteps it draws); distillation swaps in the teacher's targets (with the
    energy term's inputs when `energy` and the term is on, and the student's own states as the later levels'
    inputs when `on_student` and later_inputs is "student")."""
    batch = _to_device(batch, device)
    _seed_micro(seed, rank, micro)
    if teacher is not None:
        batch = teacher.targets(batch, energy=energy, on_student=on_student)
    return batch


class _Window:
    """The training loss and time since the last metrics record; `train_time` sums the windows over the run.
    Time spent validating, evaluating and checkpointing is left out, so samples/s measure training alone."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.train_time = 0.0

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss += step_loss
        self.steps += 1

    def record(self, acc, step: int, epoch: int, lr: float, samples_per_step: int) -> dict[str, Any]:
        """The window's metrics record (its loss averaged over the processes), and a new window begins."""
        now = time.perf_counter()
        self.train_time += now - self.start
        rank_losses = acc.gather((self.loss / self.steps).reshape(1))
        loss = float(rank_losses.mean())
        if not math.isfinite(loss):
            raise DpkitError(f"training diverged: loss is {loss} at step {step} (try a lower train.lr)")
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": self.steps * samples_per_step / max(now - self.start, 1e-9),
        }
        if acc.num_processes > 1:  # each process trains on its own shard: show that they all did
            record["rank_losses"] = [float(x) for x in rank_losses]
        self.loss.zero_()
        self.steps = 0
        return record

    def restart(self) -> None:
        """The new window's clock starts now (after the record's validation and logging)."""
        self.start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        self.start += seconds


def _validate(acc, policy: torch.nn.Module, val_ds: PushTDataset, t: TrainConfig, teacher) -> float | None:
    """The validation loss, computed by the main process (None on the others, or without a validation split);
    a distillation's on the held-out demonstrations' windows alone, and its regression alone (no energy term,
    and noised actions at the later levels whatever later_inputs, so runs' validation losses compare)."""
    val = None
    if acc.is_main_process:
        val = validation_loss(policy, val_ds, t.batch_size, t.val_batches, t.seed, acc.device,
                              prepare=(lambda b: teacher.targets(b, rollouts=False, energy=False, on_student=False))
                              if teacher is not None else None)
    acc.wait_for_everyone()
    return val


class _Evaluations:
    """The run's rollout evaluations and its best score (the first sampler's). Checkpoints carry both, so a
    resumed run's summary and checkpoints/best account for the evaluations made before it. Only the main
    process runs evaluations."""

    def __init__(self, state: dict[str, Any] | None):
        self.done: list[dict[str, Any]] = list(state.get("evaluations", [])) if state is not None else []
        saved = state.get("best_score") if state is not None else None
        self.best = float(saved) if saved is not None else -math.inf
        self.seconds = 0.0

    def best_or_none(self) -> float | None:
        return self.best if math.isfinite(self.best) else None

    def run(self, rollout_eval: Callable[[Any], Any], policy: torch.nn.Module, step: int,
            metrics: _Metrics) -> tuple[float, bool]:
        """Score `policy` at `step`, log and print the result; (its score, whether it is the best so far)."""
        t0 = time.perf_counter()
        results = _score_rollouts(rollout_eval, policy)
        self.seconds += time.perf_counter() - t0
        self.done.append({"step": step, "samplers": results})
        score = next(iter(results.values()))["score"]  # the first sampler picks the best
        best = score > self.best
        self.best = max(self.best, score)
        record = {"step": step, "score": score, "best_score": self.best, "eval": results}
        for label, r in results.items():  # flat scalars for TensorBoard
            record[f"score/{label}"] = r["score"]
            if r["success_rate"] is not None:
                record[f"success_rate/{label}"] = r["success_rate"]
        metrics.log(record)
        shown = ", ".join(f"{label} {r['score']:.3f}" for label, r in results.items())
        print(f"\nstep {step}: rollout score {shown} (best {self.best:.3f})")
        return score, best


def _rollout_round(collect: Callable[[Any, int], Any], policy: torch.nn.Module, teacher, r: int, step: int,
                   metrics: _Metrics | None) -> dict[str, Any]:
    """Distillation's rollout round r at `step`: the student's windows join the teacher's data; the round's
    record (the student's score on those start states comes free). `metrics` None: not the main process."""
    t0 = time.perf_counter()
    windows, report = collect(policy, r)
    teacher.add_rollout_windows({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in windows.items()})
    record = {"step": step, "round": r, "episodes": report["n_episodes"],
              "seed_start": report["seed_start"], "score": report["score"],
              "windows": len(next(iter(windows.values()))), "total_windows": teacher.rollout_windows,
              "seconds": time.perf_counter() - t0}
    if metrics is not None:
        metrics.log({"step": step, "rollout": record})
        print(f"\nstep {step}: rollout round {r}: student score {record['score']:.3f} on {record['episodes']} "
              f"episodes, +{record['windows']} windows ({record['total_windows']} in all)")
    return record


def _cpu_total(cpu_before: float | None, cpu_this_run: float) -> float | None:
    """This process's CPU time in the training loops of every run of the run folder so far (resumed runs
    add theirs to the checkpoint's; work after a killed run's last checkpoint is not counted)."""
    return None if cpu_before is None else cpu_before + cpu_this_run


def _save_checkpoint(run_dir: Path, cfg: Config, step: int, policy: torch.nn.Module, ema: EMA | None, optimizer,
                     scheduler, normalizer, *, epoch: int, world: int, data_path: Path, evaluations: _Evaluations,
                     teacher, rollouts: list[dict[str, Any]], metrics: dict[str, float | None],
                     cpu_s_total: float | None) -> Path:
    """checkpoints/step_NNNNNN: the weights, optimizer and schedule, and all a resume needs to continue exactly."""
    return ckpt_io.save_checkpoint(
        run_dir,
        step,
        model=policy,
        ema_model=ema.module if ema is not None else None,
        keep=cfg.train.keep_checkpoints,
        state={
            "config": cfg.to_dict(),
            "normalizer": normalizer.to_dict(),
            "epoch": epoch,
            "ema_updates": ema.updates if ema is not None else 0,
            "world_size": world,
            "data_path": str(data_path),
            "best_score": evaluations.best_or_none(),
            "evaluations": evaluations.done,
            "rng": "reseeded per micro-batch from (train.seed, rank, step * grad_accum_steps + i)",
            "metrics": metrics,
            "cpu_s_total": cpu_s_total,
            **({"teacher": teacher.describe()} if teacher is not None else {}),
            **({"rollouts": rollouts} if rollouts else {}),
        },
        trainer_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       **({"teacher_cache": teacher.cache_state()} if teacher is not None and teacher.draws else {}),
                       **({"rollout_windows": teacher.rollout_state()} if teacher is not None and rollouts else {})},
    )


def _summary(cfg: Config, run_dir: Path, acc, *, step: int, steps_this_run: int, stopped_early: bool,
             last_loss: float | None, val_loss: float | None, evaluations: _Evaluations, samples: int,
             train_time: float, wall: float, cpu0: float, cpu_before: float | None, thread_choice, teacher,
             rollouts: list[dict[str, Any]]) -> dict[str, Any]:
    """train_summary.json (and train()'s result)."""
    t = cfg.train
    cpu = time.process_time() - cpu0
    return {
        "config": cfg.name,
        "run_dir": str(run_dir),
        "steps": step,
        "steps_this_run": steps_this_run,
        "target_steps": t.steps,
        "stopped_by_time_limit": stopped_early,
        "time_limit_s": t.time_limit_s,
        "final_loss": last_loss,
        "val_loss": val_loss,
        "best_score": evaluations.best_or_none(),
        "protocol": protocol_summary(evaluations.done, t.eval_last, t.eval_episodes if t.eval_every > 0 else None),
        "evaluations": evaluations.done,
        "samples_per_s": samples / train_time if train_time > 0 else None,
        "wall_s": wall,
        "eval_s": evaluations.seconds,
        "cpu_s": cpu,  # this run's training loop (a resumed run's part alone)
        "cpu_s_total": _cpu_total(cpu_before, cpu),  # every run of the run folder's
        "checkpoint": str(ckpt_io.checkpoints_dir(run_dir) / f"step_{step:06d}"),
        "processes": acc.num_processes,
        "threads": thread_choice.to_json(),
        "load_avg_end": load_average(),
        "device": str(acc.device),
        "dpkit_version": dpkit.__version__,
        **({"teacher": teacher.describe()} if teacher is not None else {}),
        **({"rollouts": rollouts} if rollouts else {}),
    }
