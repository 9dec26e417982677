"""DiffusionPolicy: training loss, sampling with diffusers schedulers, injected noise, errors, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpkit.errors import DpkitError
from dpkit.train.config import load_config
from dpkit.train.normalizer import Normalizer
from dpkit.train.policy import DiffusionPolicy

# Narrow enough that a 100-step DDPM loop takes well under a second.
SMALL = ["policy.down_dims=[16,32,64]", "policy.diffusion_step_embed_dim=16", "policy.resnet_width=8",
         "policy.spatial_softmax_keypoints=4", "policy.image_feature_dim=8"]


def make_policy(mode: str = "lowdim", *overrides: str, seed: int = 0) -> DiffusionPolicy:
    cfg = load_config("tiny", [f"policy.obs_mode={mode}", *SMALL, *overrides]).policy
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({
        "action": rng.uniform(20, 500, (200, cfg.action_dim)),
        "obs": rng.uniform(0, 512, (200, 20)),
        "agent_pos": rng.uniform(20, 500, (200, 2)),
    })
    torch.manual_seed(seed)
    return DiffusionPolicy(cfg, norm)


def random_obs(policy: DiffusionPolicy, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, _ in policy.obs_specs:
        x = torch.rand(batch, policy.cfg.n_obs_steps, *shape, generator=g)
        out[name] = x if name == "image" else x * 512
    return out


class Recorder(torch.nn.Module):
    """Wraps the denoiser and records every call's (sample, timestep, noise_pred)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, t, cond):
        eps = self.inner(x, t, cond)
        self.calls.append((x.clone(), t.clone(), eps.clone()))
        return eps



def _ort_session(path):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---- shapes and training --------------------------------------------------------------------------


@pytest.mark.parametrize("mode,width", [("lowdim", 20), ("image", 8 + 2)])
@pytest.mark.parametrize("horizon", [16, 10])
def test_encoder_and_loss_shapes(mode, width, horizon):
    policy = make_policy(mode, f"policy.horizon={horizon}")
    To = policy.cfg.n_obs_steps
    assert policy.obs_keys == (["image", "agent_pos"] if mode == "image" else ["obs"])
    assert policy.cond_dim == To * width
    obs = random_obs(policy, 3)
    cond = policy.encoder(*[obs[k] for k in policy.obs_keys])
    assert cond.shape == (3, policy.cond_dim)
    if mode == "lowdim":  # normalized with the "obs" stats, then flattened step by step
        assert torch.allclose(cond, policy.normalizer.normalize("obs", obs["obs"]).reshape(3, -1))
    loss = policy({"obs": obs, "action": torch.rand(3, horizon, 2) * 400 + 50})
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in policy.denoiser.parameters())
    policy.eval()
    assert policy.predict_action(obs, sampler="ddim", steps=3).shape == (3, policy.cfg.n_action_steps, 2)


def test_loss_falls_when_overfitting_a_fixed_batch():
    policy = make_policy("lowdim")
    obs = random_obs(policy, 8)
    action = torch.rand(8, 16, 2) * 400 + 50
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = policy({"obs": obs, "action": action})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.3 * first, (first, last)


# ---- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,steps,expected_calls", [("ddpm", None, 100), ("ddpm", 10, 10), ("ddim", None, 10)])
def test_sample_shapes_determinism_and_step_counts(sampler, steps, expected_calls):
    policy = make_policy().eval()
    policy.denoiser = Recorder(policy.denoiser)
    obs = random_obs(policy, 2)
    a = policy.sample(obs, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 16, 2) and len(policy.denoiser.calls) == expected_calls
    b = policy.sample(obs, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(1))
    c = policy.sample(obs, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    if policy.cfg.clip_sample:
        assert a.abs().max() <= 1.0 + 1e-5  # the last step returns the clipped x0 prediction


def _doc_reverse_step(sched, sampler, x, t, p, eps, noise):
    """The reverse step exactly as written in docs/bundle-format.md, in float64."""
    ac = sched.alphas_cumprod.double().numpy()
    a_t = ac[t]
    a_p = ac[p] if p >= 0 else 1.0  # final_alpha_cumprod: 1 (DDIM set_alpha_to_one; DDPM's `one`)
    x, eps = x.double().numpy(), eps.double().numpy()
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1.0, 1.0)
    if sampler == "ddim":
        return np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps
    b_t = 1 - a_t / a_p
    out = (np.sqrt(a_p) * b_t / (1 - a_t)) * x0 + (np.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t)) * x
    if t > 0:
        out = out + np.sqrt(max((1 - a_p) / (1 - a_t) * b_t, 1e-20)) * noise.double().numpy()
    return out


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddpm", 10), ("ddim", 10)])
def test_injected_noise_follows_documented_reverse_step(sampler, steps):
    policy = make_policy().eval()
    policy.denoiser = Recorder(policy.denoiser)
    obs = random_obs(policy, 2)
    g = torch.Generator().manual_seed(3)
    init = torch.randn(2, 16, 2, generator=g)
    step_noise = torch.randn(steps, 2, 16, 2, generator=g)
    out = policy.sample(obs, sampler=sampler, steps=steps, initial_noise=init, step_noise=step_noise)

    sched = policy.make_scheduler(sampler, steps)
    timesteps = sched.timesteps.tolist()
    calls = policy.denoiser.calls
    assert [int(c[1][0]) for c in calls] == timesteps
    assert torch.equal(calls[0][0], init)
    worst = 0.0
    for k, (x, t, eps) in enumerate(calls):
        p = timesteps[k + 1] if k + 1 < steps else -1
        expected = _doc_reverse_step(sched, sampler, x, timesteps[k], p, eps, step_noise[k])
        got = (calls[k + 1][0] if k + 1 < steps else out).double().numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    # diffusers computes b_t = 1 - a_t / a_p in float32; near t = 0 that cancellation alone moves the
    # mean by up to ~6e-6 from the float64 formula (measured), whatever the noise.
    assert worst < 2e-5, worst


@pytest.mark.parametrize("k", range(10))
def test_ddpm_step_noise_enters_with_documented_sigma(k):
    """Changing only step_noise[k] moves x_{k+1} by exactly sigma_k * delta (the float32 mean cancels)."""
    policy = make_policy().eval()
    obs = random_obs(policy, 2)
    g = torch.Generator().manual_seed(4)
    init = torch.randn(2, 16, 2, generator=g)
    noise_a = torch.randn(10, 2, 16, 2, generator=g)
    noise_b = noise_a.clone()
    noise_b[k] = torch.randn(2, 16, 2, generator=g)
    recorder = policy.denoiser = Recorder(policy.denoiser)
    states = []  # x_0 ... x_10 of each run
    for noise in (noise_a, noise_b):
        recorder.calls.clear()
        out = policy.sample(obs, sampler="ddpm", steps=10, initial_noise=init, step_noise=noise)
        states.append([c[0] for c in recorder.calls] + [out])
    sched = policy.make_scheduler("ddpm", 10)
    t = int(sched.timesteps[k])
    p = int(sched.timesteps[k + 1]) if k + 1 < 10 else -1
    ac = sched.alphas_cumprod.double().numpy()
    a_t, a_p = ac[t], (ac[p] if p >= 0 else 1.0)
    sigma = np.sqrt(max((1 - a_p) / (1 - a_t) * (1 - a_t / a_p), 1e-20)) if t > 0 else 0.0
    assert torch.equal(states[0][k], states[1][k])  # identical up to step k
    moved = (states[1][k + 1] - states[0][k + 1]).double().numpy()
    expected = sigma * (noise_b[k] - noise_a[k]).double().numpy()
    assert np.abs(moved - expected).max() < 1e-6
    if t == 0:
        assert not moved.any()  # unused at t = 0


def test_ddpm_injected_noise_equals_generator_draws():
    """Injecting the generator's own draws reproduces the un-injected path (both code paths agree)."""
    policy = make_policy().eval()
    obs = random_obs(policy, 2)
    steps = 10
    a = policy.sample(obs, sampler="ddpm", steps=steps, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    init = torch.randn(2, 16, 2, generator=g)
    draws = [torch.randn(2, 16, 2, generator=g) for _ in range(steps - 1)]  # no draw at t = 0
    step_noise = torch.stack(draws + [torch.full((2, 16, 2), 7.0)])  # last one must be ignored
    b = policy.sample(obs, sampler="ddpm", steps=steps, initial_noise=init, step_noise=step_noise)
    assert torch.allclose(a, b, atol=1e-5)
    c = policy.sample(obs, sampler="ddpm", steps=steps, initial_noise=init, step_noise=step_noise.flip(0))
    assert not torch.allclose(a, c, atol=1e-3)
    # DDIM (eta = 0) is deterministic given the initial noise: step noise changes nothing.
    d1 = policy.sample(obs, sampler="ddim", initial_noise=init)
    d2 = policy.sample(obs, sampler="ddim", initial_noise=init, step_noise=torch.randn(10, 2, 16, 2))
    assert torch.equal(d1, d2)


def test_predict_action_slice_and_unnormalization():
    policy = make_policy("lowdim", "policy.n_obs_steps=3", "policy.n_action_steps=5").eval()
    obs = random_obs(policy, 2)
    init = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    traj = policy.sample(obs, sampler="ddim", initial_noise=init)
    act = policy.predict_action(obs, sampler="ddim", initial_noise=init)
    assert act.shape == (2, 5, 2)
    stats = policy.normalizer.to_dict()["action"]
    scale, offset = torch.tensor(stats["scale"]), torch.tensor(stats["offset"])
    assert torch.allclose(act, ((traj - offset) / scale)[:, 2:7], atol=1e-4)


# ---- errors -------------------------------------------------------------------------------------------


def test_bad_observations_and_arguments_raise_dpkit_error():
    policy = make_policy("image").eval()
    obs = random_obs(policy, 2)
    with pytest.raises(DpkitError, match="'agent_pos' missing"):
        policy.sample({"image": obs["image"]})
    with pytest.raises(DpkitError, match=r"expected shape \(2, 2, 2\), got \(2, 3, 2\)"):
        policy.sample({**obs, "agent_pos": torch.zeros(2, 3, 2)})
    with pytest.raises(DpkitError, match=r"expected shape \(B, 2, 3, 96, 96\), got \(2, 2, 96, 96, 3\)"):
        policy.sample({**obs, "image": obs["image"].permute(0, 1, 3, 4, 2)})
    bad = obs["agent_pos"].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DpkitError, match="NaN"):
        policy.sample({**obs, "agent_pos": bad})
    with pytest.raises(DpkitError, match="floating point"):
        policy.sample({**obs, "image": (obs["image"] * 255).to(torch.uint8)})
    with pytest.raises(DpkitError, match="unknown sampler 'euler'"):
        policy.sample(obs, sampler="euler")
    for steps in (0, 101, 2.5):
        with pytest.raises(DpkitError, match=r"steps must be (an integer|a positive integer)"):
            policy.sample(obs, sampler="ddim", steps=steps)
    with pytest.raises(DpkitError, match="initial_noise: expected shape"):
        policy.sample(obs, sampler="ddim", initial_noise=torch.zeros(2, 16, 3))
    with pytest.raises(DpkitError, match=r"step_noise: expected shape \(10, 2, 16, 2\)"):
        policy.sample(obs, sampler="ddpm", steps=10, step_noise=torch.zeros(9, 2, 16, 2))
    with pytest.raises(DpkitError, match="action: expected shape"):
        policy({"obs": obs, "action": torch.zeros(2, 10, 2)})
    with pytest.raises(DpkitError, match="lacks statistics for 'agent_pos'"):
        DiffusionPolicy(policy.cfg, policy.normalizer.subset(["action", "obs"]))


# ---- ONNX export (the export stage relies on it) ------------------------------------------------------


@pytest.mark.parametrize("mode", ["lowdim", "image"])
def test_onnx_export_matches_pytorch(mode, tmp_path):
    policy = make_policy(mode, "policy.horizon=10").eval()  # H=10 exercises the U-Net's time padding
    batch = torch.export.Dim("batch", min=1, max=1024)

    obs = random_obs(policy, 2)
    args = tuple(obs[k] for k in policy.obs_keys)
    torch.onnx.export(
        policy.encoder, args, tmp_path / "encoder.onnx", dynamo=True, input_names=policy.obs_keys,
        output_names=["cond"], dynamic_shapes=tuple({0: batch} for _ in args), external_data=False, verbose=False,
    )
    obs3 = random_obs(policy, 3, seed=1)  # another batch size than the traced one
    ref = policy.encoder(*[obs3[k] for k in policy.obs_keys]).detach().numpy()
    sess = _ort_session(tmp_path / "encoder.onnx")
    got = sess.run(["cond"], {k: v.numpy() for k, v in obs3.items()})[0]
    assert np.abs(got - ref).max() < 1e-4

    if mode == "image":
        return  # the denoiser does not depend on the observation mode; export it once
    args = (torch.randn(2, 10, 2), torch.tensor([5, 99]), torch.randn(2, policy.cond_dim))
    torch.onnx.export(
        policy.denoiser, args, tmp_path / "denoiser.onnx", dynamo=True,
        input_names=["sample", "timestep", "cond"], output_names=["noise_pred"],
        dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), external_data=False, verbose=False,
    )
    x, t, c = torch.randn(3, 10, 2), torch.tensor([0, 42, 99]), torch.randn(3, policy.cond_dim)
    ref = policy.denoiser(x, t, c).detach().numpy()
    sess = _ort_session(tmp_path / "denoiser.onnx")
    got = sess.run(["noise_pred"], {"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4
