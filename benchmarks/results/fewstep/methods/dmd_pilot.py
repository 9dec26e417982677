"""Throwaway pilot: distribution matching (DMD-style, as in OneDP) on a finished regression student's first call.
Usage: dmd_pilot.py TEACHER_RUN STUDENT_RUN CPU_S [anchor] [g_lr] [f_lr]
STUDENT_RUN: a copy of a recipe student's run folder; its EMA weights start the generator (the one-call map
noise -> x0 at t=99). A fake score network, started from the teacher, learns the student's action distribution
(epsilon loss on the student's own samples); the generator moves each sample by the difference of the fake's and
the teacher's x0 estimates at a random noise level (normalized as in DMD), plus `anchor` x a regression onto the
starting student's output from the same noise. Per-step weights as the recipe's (0.1 off the executed steps)."""
import copy, json, math, sys, time
import numpy as np, torch
from dpkit.train.checkpoint import load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from dpkit.train.config import Config
from dpkit.train.data import load_datasets, to_tensors
from dpkit.train.distill import step_weights
from dpkit.train.policy import window_mse
from dpkit.train.trainer import EMA

torch.set_num_threads(1)
teacher_run, student_run, budget = sys.argv[1], sys.argv[2], float(sys.argv[3])
anchor = float(sys.argv[4]) if len(sys.argv) > 4 else 0.25
g_lr = float(sys.argv[5]) if len(sys.argv) > 5 else 3e-5
f_lr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-4
f_per_g = int(sys.argv[7]) if len(sys.argv) > 7 else 1  # fake-score updates per generator update
t0 = time.process_time()
teacher, _ = load_checkpoint(teacher_run, ema=True)
teacher.eval().requires_grad_(False)
fake, _ = load_checkpoint(teacher_run, ema=True)
fake.train().requires_grad_(True)
student, st = load_checkpoint(student_run, ema=True)
student.train().requires_grad_(True)
init = copy.deepcopy(student).eval().requires_grad_(False)
cfg = Config.from_dict(st["config"])
w = step_weights(cfg.policy, 0.1)
train_ds, _ = load_datasets(cfg)
ab = torch.tensor(teacher.schedule_arrays.alphas_cumprod, dtype=torch.float32)
ema = EMA(student, 0.75, 0.9999)
g_opt = torch.optim.AdamW(student.parameters(), lr=g_lr, betas=(0.9, 0.999), weight_decay=0.0)
f_opt = torch.optim.AdamW(fake.parameters(), lr=f_lr, betas=(0.9, 0.999), weight_decay=0.0)
rng = np.random.default_rng(0); torch.manual_seed(0)
B, fake_warm = 64, 100
T99 = torch.full((B,), 99, dtype=torch.long)
steps, log = 0, []


def q(x, t, n):
    a = ab[t][:, None, None]
    return a.sqrt() * x + (1 - a).sqrt() * n


def x0_of(eps, x_t, t):
    a = ab[t][:, None, None]
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def cond_of(m, obs):
    return m.encoder(*m._check_obs(obs, check_finite=False))


while time.process_time() - t0 < budget:
    batch = to_tensors(train_ds.__getitems__(rng.integers(0, len(train_ds), B)))
    obs = batch["obs"]
    z = torch.randn(B, cfg.policy.horizon, teacher.normalizer.normalize("action", batch["action"].float()).shape[-1])
    gen = steps >= fake_warm and (steps - fake_warm) % f_per_g == 0
    with torch.set_grad_enabled(gen):
        x = student.denoiser(z, T99, cond_of(student, obs))
    # the fake score learns the student's current distribution
    xd = x.detach()
    tf = torch.from_numpy(rng.integers(0, 100, B))
    n = torch.randn_like(xd)
    f_loss = (fake.denoiser(q(xd, tf, n), tf, cond_of(fake, obs)) - n).square().mean()
    f_opt.zero_grad(set_to_none=True); f_loss.backward(); f_opt.step()
    rec = {"step": steps, "f_loss": float(f_loss.detach())}
    if gen:
        tg = torch.from_numpy(rng.integers(2, 91, B))
        n = torch.randn_like(xd)
        with torch.no_grad():
            x_t = q(xd, tg, n)
            x0_r = x0_of(teacher.denoiser(x_t, tg, cond_of(teacher, obs)), x_t, tg)
            x0_f = x0_of(fake.denoiser(x_t, tg, cond_of(fake, obs)), x_t, tg)
            norm = (xd - x0_r).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-3)
            grad = (x0_f - x0_r) / norm
            ref = init.denoiser(z, T99, cond_of(init, obs))
        dm = window_mse(x - (xd - grad), w).mean() * 0.5
        an = window_mse(x - ref, w).mean()
        loss = dm + anchor * an
        g_opt.zero_grad(set_to_none=True); loss.backward(); g_opt.step()
        ema.update(student)
        rec.update(dm=float(dm), anchor=float(an), grad_rms=float(grad.square().mean().sqrt()))
    steps += 1
    if steps % 50 == 0:
        rec["cpu_s"] = time.process_time() - t0
        print(json.dumps(rec), flush=True)
cpu = time.process_time() - t0
ck = resolve_checkpoint(student_run)
state = {k: v for k, v in read_state(ck).items() if k not in ("format", "format_version", "dpkit_version", "step", "weights", "checkpoint_path")}
state["ema_updates"] = ema.updates
step0 = int(read_state(ck)["step"])
save_checkpoint(student_run, step0 + 1, model=student, ema_model=ema.module, state=state, keep=1)
json.dump({"steps": steps, "cpu_s_script": cpu, "anchor": anchor, "g_lr": g_lr, "f_lr": f_lr, "f_per_g": f_per_g, "budget": budget},
          open(student_run + "_dmd.json", "w"))
print("done", steps, cpu, flush=True)
