"""Throwaway pilot: progressive distillation (PD) of a pusht_lowdim_cpu teacher into a one-call student, within
the recipe's CPU budget. Not part of dpkit. Usage: pd.py TEACHER_RUN STUDENT_RUN BUDGET_CPU_S
STUDENT_RUN: made by `dpkit-distill TEACHER --out STUDENT_RUN --train-steps 1 'distill.timesteps=[99]'`.
Rounds: the teacher's DDIM over 8 timesteps (99, 87, 74, 62, 49, 37, 24, 12) -> a 4-step student (99, 74, 49, 24)
-> 2 steps (99, 49) -> 1 step (99). Each round's student (x0-predicting, deterministic DDIM) learns to take in one
step what the previous model takes in two: its target x0 is the one whose DDIM step from x_t lands where the
previous model's two steps land (at the last step, that state itself). Inputs: the window's actions noised to t
(pure noise at 99). Each round starts from the previous round's EMA weights (the first from the teacher's), and its
EMA is the next round's teacher. Loss, optimizer and batch as the recipe's; the budget is split evenly over rounds."""
import copy, json, math, sys, time
import numpy as np, torch
from dpkit.sampling import SamplerSpec, StepPlan
from dpkit.train.checkpoint import load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from dpkit.train.config import Config
from dpkit.train.data import load_datasets, to_tensors
from dpkit.train.distill import step_weights
from dpkit.train.policy import window_mse
from dpkit.train.trainer import EMA

torch.set_num_threads(1)
teacher_run, student_run, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = 0.002
t0 = time.process_time()
teacher, _ = load_checkpoint(teacher_run, ema=True)
student, st = load_checkpoint(student_run, ema=False)
cfg = Config.from_dict(st["config"])
w = step_weights(cfg.policy, 0.1)
train_ds, _ = load_datasets(cfg)
acp = np.asarray(student.schedule_arrays.alphas_cumprod, dtype=np.float64)
rng = np.random.default_rng(0); torch.manual_seed(0)
B, warm = 64, 100


def plan_for(model, ts):
    ts = tuple(ts)
    return StepPlan.build(model.schedule_arrays, SamplerSpec("pd", "ddim", len(ts), ts, ts[1:] + (-1,), 1.0))


rounds = [((99, 87, 74, 62, 49, 37, 24, 12), (99, 74, 49, 24)), ((99, 74, 49, 24), (99, 49)), ((99, 49), (99,))]
prev = teacher.eval().requires_grad_(False)
log = []
for r, (tch_ts, st_ts) in enumerate(rounds):
    tplan = plan_for(prev, tch_ts)
    student.train().requires_grad_(True)
    ema = EMA(student, 0.75, 0.9999)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)
    r0 = time.process_time(); left = budget - (r0 - t0); share = left / (len(rounds) - r)
    steps, total = 0, None
    while True:
        if steps == 40 and total is None:
            per = (time.process_time() - r0) / steps
            total = int((share - (time.process_time() - r0)) / per) + steps
        if total is not None and steps >= total:
            break
        lr = 1e-3 * (steps + 1) / warm if steps < warm or total is None else \
            1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (steps - warm) / max(1, total - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = to_tensors(train_ds.__getitems__(rng.integers(0, len(train_ds), B)))
        x0 = student.normalizer.normalize("action", batch["action"].float())
        i = torch.from_numpy(rng.integers(0, len(st_ts), B))  # the student's step index
        t = torch.tensor(st_ts)[i]
        z = torch.randn_like(x0)
        a = torch.from_numpy(acp).float()[t][:, None, None]
        x_t = torch.where((t == 99)[:, None, None], z, a.sqrt() * x0 + (1 - a).sqrt() * z)
        with torch.no_grad():
            cp = prev.encoder(*prev._check_obs(batch["obs"], check_finite=False))
            x = x_t.clone()
            j = 2 * i  # the previous model's step index at the student's timestep
            for hop in range(2):
                out = prev.denoiser(x, torch.from_numpy(tplan.timesteps)[j + hop], cp)
                nxt = torch.empty_like(x)
                for k in (j + hop).unique().tolist():
                    rows = ((j + hop) == k).nonzero().flatten()
                    nxt[rows] = tplan.step(k, x[rows], out[rows], None)
                x = nxt
            # the x0 whose DDIM step from x_t (t -> the student's next timestep, or x0) lands at x
            p_ts = torch.tensor(st_ts[1:] + (-1,))[i]
            ap = torch.where(p_ts >= 0, torch.from_numpy(acp).float()[p_ts.clamp(min=0)], torch.ones(B))[:, None, None]
            k1 = ((1 - ap) / (1 - a)).sqrt()
            target = (x - k1 * x_t) / (ap.sqrt() - k1 * a.sqrt())
        cond = student.encoder(*student._check_obs(batch["obs"], check_finite=False))
        pred = student.denoiser(x_t, t, cond)
        e = window_mse(pred - target, w)
        loss = ((e + c * c).sqrt() - c).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        ema.update(student)
        steps += 1
        if steps % 200 == 0:
            print(r, steps, float(loss.detach()), time.process_time() - t0, flush=True)
    log.append({"round": r, "teacher_timesteps": tch_ts, "student_timesteps": st_ts, "steps": steps,
                "cpu_s": time.process_time() - r0})
    print("round", log[-1], flush=True)
    prev = copy.deepcopy(ema.module).eval().requires_grad_(False)
    student = copy.deepcopy(ema.module)
cpu = time.process_time() - t0
ck = resolve_checkpoint(student_run)
state = {k: v for k, v in read_state(ck).items() if k not in ("format", "format_version", "dpkit_version", "step", "weights", "checkpoint_path")}
state["ema_updates"] = sum(x["steps"] for x in log)
save_checkpoint(student_run, state["ema_updates"] + 1, model=student, ema_model=prev, state=state, keep=1)
json.dump({"rounds": log, "cpu_s_script": cpu, "budget": budget}, open(student_run + "_pd.json", "w"))
print("done", cpu, flush=True)
