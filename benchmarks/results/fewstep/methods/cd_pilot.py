"""Throwaway pilot: consistency distillation (CD) of a pusht_lowdim_cpu teacher into an x0-predicting student,
within the recipe's CPU budget. Not part of dpkit. Usage: cd.py TEACHER_RUN STUDENT_RUN BUDGET_CPU_S [mu]
STUDENT_RUN: made by `dpkit-distill TEACHER --out STUDENT_RUN --train-steps 1` (config, normalizer, student network).
Chain: the teacher's DDIM-10 timesteps 99, 89, ..., 9, then x0. Loss at level k (t_k): d(f(x_tk), sg f_target(x^_t{k+1}))
with x^ the teacher's DDIM step from x_tk; at the last level the target is the teacher's x0 itself (boundary).
Inputs: the window's actions noised to t_k (pure noise at 99, as sampling starts). Same per-step weights and
pseudo-Huber distance as the recipe."""
import copy, json, math, sys, time
import numpy as np, torch
from dpkit.train.checkpoint import load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from dpkit.train.config import Config
from dpkit.train.data import load_datasets, to_tensors
from dpkit.train.distill import ode_chain, step_weights
from dpkit.train.policy import window_mse
from dpkit.train.trainer import EMA
from dpkit.sampling import StepPlan

torch.set_num_threads(1)
teacher_run, student_run, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
mu = float(sys.argv[4]) if len(sys.argv) > 4 else 0.95
c = 0.002
t0 = time.process_time()
teacher, _ = load_checkpoint(teacher_run, ema=True)
teacher.eval().requires_grad_(False)
student, st = load_checkpoint(student_run, ema=False)
student.train()
cfg = Config.from_dict(st["config"])
plan = StepPlan.build(teacher.schedule_arrays, ode_chain(99, 10))
K = plan.num_steps  # 10 levels
w = step_weights(cfg.policy, 0.1)
train_ds, _ = load_datasets(cfg)
target_net = copy.deepcopy(student).eval().requires_grad_(False)
ema = EMA(student, 0.75, 0.9999)
opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)
rng = np.random.default_rng(0); torch.manual_seed(0)
B, warm = 64, 100
steps, total, log = 0, None, []


def lr_at(s):
    if s < warm:
        return 1e-3 * (s + 1) / warm
    return 1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))


while True:
    if steps == 60 and total is None:  # the step cost so far sets the steps the budget buys
        per = (time.process_time() - t0) / steps
        total = int((budget - (time.process_time() - t0)) / per) + steps
        print("steps", total, "per step", per, flush=True)
    if total is not None and steps >= total:
        break
    for g in opt.param_groups:
        g["lr"] = lr_at(steps) if total else 1e-3 * (steps + 1) / warm
    batch = to_tensors(train_ds.__getitems__(rng.integers(0, len(train_ds), B)))
    x0 = teacher.normalizer.normalize("action", batch["action"].float())
    k = torch.from_numpy(rng.integers(0, K, B))
    z = torch.randn_like(x0)
    sa = torch.tensor(plan.sqrt_at)[k][:, None, None]; s1 = torch.tensor(plan.sqrt_1m_at)[k][:, None, None]
    x_t = torch.where((k == 0)[:, None, None], z, sa * x0 + s1 * z)
    t_k = torch.from_numpy(plan.timesteps)[k]
    with torch.no_grad():
        ct = teacher.encoder(*teacher._check_obs(batch["obs"], check_finite=False))
        eps = teacher.denoiser(x_t, t_k, ct)
        nxt = torch.empty_like(x_t)
        for j in k.unique().tolist():
            r = (k == j).nonzero().flatten()
            nxt[r] = plan.step(j, x_t[r], eps[r], None)
        target = nxt.clone()  # last level: the teacher's x0 (boundary)
        inner = (k < K - 1).nonzero().flatten()
        if len(inner):
            cs = target_net.encoder(*target_net._check_obs({kk: v[inner] for kk, v in batch["obs"].items()}, check_finite=False))
            tn = torch.from_numpy(plan.timesteps)[k[inner] + 1]
            target[inner] = target_net.denoiser(nxt[inner], tn, cs)
    cond = student.encoder(*student._check_obs(batch["obs"], check_finite=False))
    pred = student.denoiser(x_t, t_k, cond)
    e = window_mse(pred - target, w)
    loss = ((e + c * c).sqrt() - c).mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    ema.update(student)
    with torch.no_grad():
        for p, q in zip(target_net.parameters(), student.parameters()):
            p.mul_(mu).add_(q.detach(), alpha=1 - mu)
    steps += 1
    if steps % 200 == 0:
        print(steps, float(loss), time.process_time() - t0, flush=True)
cpu = time.process_time() - t0
ck = resolve_checkpoint(student_run)
state = {k: v for k, v in read_state(ck).items() if k not in ("format", "format_version", "dpkit_version", "step", "weights", "checkpoint_path")}
state["ema_updates"] = steps
save_checkpoint(student_run, steps + 1, model=student, ema_model=ema.module, state=state, keep=1)
json.dump({"steps": steps, "cpu_s_script": cpu, "mu": mu, "budget": budget}, open(student_run + "_cd.json", "w"))
print("done", steps, cpu, flush=True)
