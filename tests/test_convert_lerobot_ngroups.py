"""dpkit-convert on a lerobot 0.6.1 policy with two legal non-default values dpkit once got wrong
(tests/data/peers/lerobot_keypoints_ngroups4_ddpm50/, made by lerobot's own code; README.txt there):

- `n_groups: 4`. lerobot (like the original diffusion_policy) builds the U-Net's final conv block with
  GroupNorm's default of 8 groups whatever n_groups is. The tensors have the same shapes for any group count,
  so the old conversion (final block with n_groups) loaded and sampled ~390 px away from lerobot without a word.
  The converter now sets `policy.final_norm_groups: 8`.
- `num_inference_steps: 50` with DDPM: lerobot's default call samples DDPM-50; the converted policy's default
  sampler is now ddpm-50 too (`policy.ddpm_steps`), not ddpm-100.

The rule for every backend and sampler (DDPM-50, DDPM-100, DDIM-10, batch 2), against lerobot's own float64 run
of the same network and draws: the normalized trajectory within TRAJ_TOL, and the executed actions within
ROUNDING_FACTOR times lerobot's own float32 error (its float32 result vs its float64 run) plus
ROUNDING_MARGIN_PX, all from
tests/peer_parity.py (where the margins are derived). The fast tests run
PyTorch; the slow ones export a bundle and run ONNX Runtime and the C++ runtime.
"""

from __future__ import annotations

import copy
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpkit.convert.source import convert_policy
# tests/peer_parity.py's margins (over the peer's own float32 error; DDIM-10 amplifies rounding). This fixture
# holds lerobot's own float64 run, so that run is the exact reference here instead of dpkit's float64 run.
from peer_parity import ROUNDING_FACTOR, ROUNDING_MARGIN_PX, TRAJ_TOL

FIXTURE = Path(__file__).resolve().parent / "data" / "peers" / "lerobot_keypoints_ngroups4_ddpm50"
# (tag in reference.npz, sampler, steps)
CASES = [("ddpm50", "ddpm", 50), ("ddpm100", "ddpm", 100), ("ddim10", "ddim", 10)]


def _source(dst: Path) -> Path:
    """The lerobot folder as save_pretrained wrote it (the weights decompressed)."""
    dst.mkdir(parents=True)
    for f in FIXTURE.iterdir():
        if f.name == "config.json" or f.name.startswith("policy_"):
            shutil.copy(f, dst / f.name)
    (dst / "model.safetensors").write_bytes(lzma.decompress((FIXTURE / "model.safetensors.xz").read_bytes()))
    return dst


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "reference.npz"))


def _obs(ref: dict) -> dict[str, np.ndarray]:
    return {"state": ref["obs_state"], "environment_state": ref["obs_environment_state"]}


def _step_noise(ref: dict, tag: str) -> np.ndarray | None:
    # lerobot draws K - 1 step noises (none at t = 0); dpkit's step_noise has one slice per step, the last unused
    if f"{tag}_step_noise" not in ref:
        return None
    draws = ref[f"{tag}_step_noise"]
    return np.concatenate([draws, np.zeros_like(draws[:1])])


def _errors(policy, ref: dict, tag: str, sampler: str | None, steps: int | None) -> dict[str, float]:
    """dpkit's and lerobot's float32 results vs lerobot's float64 run (normalized trajectory, executed px)."""
    traj = policy.sample(_obs(ref), sampler=sampler, steps=steps, initial_noise=ref["initial_noise"],
                         step_noise=_step_noise(ref, tag))
    exact = ref[f"{tag}_trajectory_normalized_float64"]
    exact_px = policy.executed_actions(exact)
    return {"traj": float(np.abs(traj - exact).max()),
            "px": float(np.abs(policy.executed_actions(traj) - exact_px).max()),
            "lerobot_px": float(np.abs(ref[f"{tag}_actions"] - exact_px).max())}


def _check(policy, ref: dict) -> dict[str, dict[str, float]]:
    out = {}
    for tag, sampler, steps in CASES:
        d = out[tag] = _errors(policy, ref, tag, sampler, steps)
        # the conversion itself: lerobot's float32 result is near its float64 run through dpkit's unnormalizer
        assert d["lerobot_px"] <= 2e-3, (tag, d)
        assert d["traj"] <= TRAJ_TOL and d["px"] <= ROUNDING_FACTOR * d["lerobot_px"] + ROUNDING_MARGIN_PX[sampler], (tag, d)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted_ngroups")
    return Path(convert_policy(_source(root / "src"), root / "run")["out"])


def test_converted_config_records_the_peers_rules(run):
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    pol = state["config"]["policy"]
    assert (pol["n_groups"], pol["final_norm_groups"]) == (4, 8)
    assert (pol["default_sampler"], pol["ddpm_steps"]) == ("ddpm", 50)
    assert state["source"]["sampler"] == "ddpm-50"


def test_converted_run_reproduces_lerobot_in_torch(run, ref):
    from dpkit.runtime import load_policy

    policy = load_policy(run, backend="torch")
    assert list(policy.obs_keys) == ["state", "environment_state"]
    unet = policy.policy.denoiser.unet
    assert unet.final[0][1].num_groups == 8 and unet.down[0][0].block1[1].num_groups == 4
    _check(policy, ref)


def test_default_call_is_lerobots_ddpm50(run, ref):
    """lerobot's saved config samples DDPM with 50 steps; so does a call that names no sampler or no steps."""
    from dpkit.runtime import load_policy

    policy = load_policy(run, backend="torch")
    choice = policy.resolve_sampler()
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 50)
    assert policy.resolve_sampler("ddpm").num_inference_steps == 50
    for sampler in (None, "ddpm"):
        d = _errors(policy, ref, "ddpm50", sampler, None)
        assert d["traj"] <= TRAJ_TOL and d["px"] <= ROUNDING_FACTOR * d["lerobot_px"] + ROUNDING_MARGIN_PX["ddpm"], d


def test_denoiser_and_first_env_step_match_lerobot(run, ref):
    """The U-Net alone on lerobot's probe input, and select_action's first step (queue filled with copies of
    the first frame; the fixture seeds the global RNG before both)."""
    import torch

    from dpkit.runtime import load_policy

    policy = load_policy(run, backend="torch")
    with torch.no_grad():
        cond = policy.policy.encoder(*(torch.from_numpy(v) for v in _obs(ref).values()))
        out = policy.policy.denoiser(torch.from_numpy(ref["denoiser_x"]), torch.from_numpy(ref["denoiser_t"]),
                                     torch.from_numpy(ref["global_cond"]))
    assert np.abs(cond.numpy() - ref["global_cond"]).max() <= 1e-6
    assert np.abs(out.numpy() - ref["denoiser_out"]).max() <= 1e-5
    obs = {k: np.repeat(v[:, :1], 2, axis=1) for k, v in _obs(ref).items()}
    traj = policy.sample(obs, initial_noise=ref["initial_noise"], step_noise=_step_noise(ref, "ddpm50"))
    assert np.abs(policy.executed_actions(traj)[:, 0] - ref["ddpm50_select_action_first_step"]).max() <= 2e-3


def test_final_block_with_n_groups_is_hundreds_of_px_off(run, ref):
    """What the conversion gave before final_norm_groups (the final block with n_groups = 4): the fixture
    tells the two rules apart by far more than any tolerance."""
    from dpkit.runtime import load_policy
    from dpkit.runtime.torch_policy import TorchPolicy
    from dpkit.train.policy import DiffusionPolicy

    converted = load_policy(run, backend="torch").policy
    cfg = copy.deepcopy(converted.cfg)
    cfg.final_norm_groups = None
    old = DiffusionPolicy(cfg, converted.normalizer)
    old.load_state_dict(converted.state_dict())  # the same tensors load: only the outputs differ
    old.eval()
    assert old.denoiser.unet.final[0][1].num_groups == 4
    for tag, sampler, steps in CASES:
        assert _errors(TorchPolicy(policy=old), ref, tag, sampler, steps)["px"] > 100, tag


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory) -> Path:
    from dpkit.export.writer import export_bundle

    out = tmp_path_factory.mktemp("ngroups_bundle") / "bundle"
    export_bundle(run, out, ddim_steps=(10,), data=str(out.parent / "no_dataset"), log=lambda _m: None)
    return out


@pytest.mark.parametrize("backend", ["ort", "cpp"])
def test_exported_bundle_reproduces_lerobot(bundle, ref, backend):
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    policy = load_policy(bundle, backend=backend)
    _check(policy, ref)
    choice = policy.resolve_sampler()
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 50)
    assert policy.resolve_sampler("ddpm").num_inference_steps == 50
    d = _errors(policy, ref, "ddpm50", None, None)  # the default call
    assert d["traj"] <= TRAJ_TOL and d["px"] <= ROUNDING_FACTOR * d["lerobot_px"] + ROUNDING_MARGIN_PX["ddpm"], d
    manifest = json.loads((bundle / "policy.json").read_text())
    assert manifest["scheduler"]["default_sampler"] == "ddpm-50"
    assert {"ddpm-50", "ddpm-100", "ddim-10"} <= {s["name"] for s in manifest["scheduler"]["samplers"]}
    assert manifest["config"]["policy"]["final_norm_groups"] == 8


# ---- checkpoints written before final_norm_groups / ddpm_steps keep their meaning -------------------------

def _old_checkpoint(tmp_path: Path):
    """A run saved as dpkit did before the two fields existed: n_groups 4 everywhere, DDPM default, and a
    state.json config without final_norm_groups / ddpm_steps."""
    import torch

    from dpkit.train.checkpoint import save_checkpoint
    from dpkit.train.config import load_config
    from dpkit.train.normalizer import Normalizer
    from dpkit.train.policy import DiffusionPolicy

    cfg = load_config("tiny", ["policy.n_groups=4", "policy.final_norm_groups=null", "policy.down_dims=[16,32]",
                               "policy.default_sampler=ddpm", "train.ema=false"])
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"action": rng.uniform(20, 500, (50, 2)), "obs": rng.uniform(20, 500, (50, 20))})
    torch.manual_seed(0)
    policy = DiffusionPolicy(cfg.policy, norm).eval()
    with torch.no_grad():  # non-trivial GroupNorm affine parameters, so the group rule shows in the outputs
        for m in policy.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
    config = cfg.to_dict()
    del config["policy"]["final_norm_groups"], config["policy"]["ddpm_steps"]
    save_checkpoint(tmp_path / "run", 1, model=policy, ema_model=None,
                    state={"config": config, "normalizer": norm.to_dict()})
    return policy, tmp_path / "run"


def test_checkpoint_without_the_new_fields_loads_and_samples_unchanged(tmp_path):
    from dpkit.runtime import load_policy
    from dpkit.runtime.torch_policy import TorchPolicy

    original, run = _old_checkpoint(tmp_path)
    loaded = load_policy(run, backend="torch")
    assert loaded.policy.cfg.final_norm_groups is None and loaded.policy.cfg.ddpm_steps is None
    assert loaded.policy.denoiser.unet.final[0][1].num_groups == 4
    choice = loaded.resolve_sampler()
    assert (choice.sampler, choice.num_inference_steps) == ("ddpm", 100)
    rng = np.random.default_rng(1)
    obs = {"obs": rng.uniform(50, 450, (2, 2, 20)).astype(np.float32)}
    noise = rng.standard_normal((2, 16, 2)).astype(np.float32)
    want = TorchPolicy(policy=original).sample(obs, sampler="ddim", steps=4, initial_noise=noise)
    assert np.array_equal(loaded.sample(obs, sampler="ddim", steps=4, initial_noise=noise), want)


def test_resume_cannot_change_a_group_count(tmp_path):
    from dpkit.errors import DpkitError
    from dpkit.train.checkpoint import check_resume_config, latest_checkpoint, read_state
    from dpkit.train.config import load_config

    _, run = _old_checkpoint(tmp_path)
    ckpt = latest_checkpoint(run)
    state = read_state(ckpt)
    base = ["policy.n_groups=4", "policy.down_dims=[16,32]", "train.ema=false"]
    for ok in ("policy.final_norm_groups=null", "policy.final_norm_groups=4"):
        check_resume_config(ckpt, state, load_config("tiny", [*base, ok]))
    with pytest.raises(DpkitError, match=r"--resume cannot change policy.final_norm_groups \(checkpoint step_000001: "
                                         r"4 groups, asked: 8\).*set policy.final_norm_groups=4"):
        check_resume_config(ckpt, state, load_config("tiny", base))  # tiny.yaml says 8


def test_original_converter_records_the_peers_final_block_rule(tmp_path, monkeypatch):
    """The original diffusion_policy builds its final block like lerobot (8 groups whatever n_groups). Its
    committed hybrid fixture has n_groups 8; read with n_groups 4 in its config, the run records both rules
    (the weights' shapes are the same for any group count)."""
    import dpkit.convert.original as original

    ckpt = tmp_path / "latest.ckpt"
    ckpt.write_bytes(lzma.decompress((FIXTURE.parent / "original_pusht_hybrid_tiny" / "latest.ckpt.xz").read_bytes()))
    real = original.load_torch_zip

    def with_n_groups_4(path):
        payload = real(path)
        payload["cfg"]["policy"]["n_groups"] = 4
        return payload

    monkeypatch.setattr(original, "load_torch_zip", with_n_groups_4)
    run = Path(convert_policy(ckpt, tmp_path / "run")["out"])
    state = json.loads(next((run / "checkpoints").glob("step_*/state.json")).read_text())
    assert (state["config"]["policy"]["n_groups"], state["config"]["policy"]["final_norm_groups"]) == (4, 8)
    assert (state["config"]["policy"]["default_sampler"], state["config"]["policy"]["ddpm_steps"]) == ("ddpm", 100)


# ---- clip_sample_range and clip_sample: false, against lerobot on the same weights --------------------------

# (config.json edit, {tag: (sampler, steps)}); the DDPM variants used the saved config's DDPM-50 draws
CLIP_VARIANTS = {"clip15": ({"clip_sample_range": 1.5}, {"clip15_ddpm50": ("ddpm", 50), "clip15_ddim10": ("ddim", 10)}),
                 "noclip": ({"clip_sample": False}, {"noclip_ddpm50": ("ddpm", 50), "noclip_ddim10": ("ddim", 10)})}


def _check_clip(policy, ref: dict, tags: dict[str, tuple[str, int]]) -> dict[str, dict[str, float]]:
    """As _check, against lerobot's float64 run of the variant. Unclipped, this random-init network's x0
    estimates run away (the DDPM-50 trajectory reaches ~240 normalized, tens of thousands of px) and float32
    rounding grows with them: lerobot's own float32 run is 1.4e-4 (normalized) / 3.2e-2 px from its float64 run
    there. So both bounds scale with lerobot's own error: twice it (two float32 runs of one computation in a
    different order) plus the fixed margins, which is the fixed margins alone where clipping keeps it small."""
    out = {}
    for tag, (sampler, steps) in tags.items():
        traj = policy.sample(_obs(ref), sampler=sampler, steps=steps, initial_noise=ref["initial_noise"],
                             step_noise=_step_noise(ref, "ddpm50") if sampler == "ddpm" else None)
        exact = ref[f"{tag}_trajectory_normalized_float64"]
        exact_px = policy.executed_actions(exact)
        d = out[tag] = {"traj": float(np.abs(traj - exact).max()),
                        "px": float(np.abs(policy.executed_actions(traj) - exact_px).max()),
                        "lerobot_traj": float(np.abs(ref[f"{tag}_trajectory_normalized"] - exact).max()),
                        "lerobot_px": float(np.abs(ref[f"{tag}_actions"] - exact_px).max())}
        # the reference differs from the clip-1 result by far more than any bound: the variant is tested
        base = tag.split("_", 1)[1]
        assert np.abs(ref[f"{tag}_trajectory_normalized"] - ref[f"{base}_trajectory_normalized"]).max() > 0.5
        assert d["traj"] <= 2 * d["lerobot_traj"] + TRAJ_TOL, (tag, d)
        assert d["px"] <= ROUNDING_FACTOR * d["lerobot_px"] + ROUNDING_MARGIN_PX[sampler], (tag, d)
    return out


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted_clip")
    runs = {}
    for name, (edit, _) in CLIP_VARIANTS.items():
        src = _source(root / "src" / name)
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(edit)
        (src / "config.json").write_text(json.dumps(cfg))
        runs[name] = Path(convert_policy(src, root / name)["out"])
    return runs


@pytest.mark.parametrize("name", list(CLIP_VARIANTS))
def test_clip_variants_reproduce_lerobot_in_torch(clip_runs, ref, name):
    from dpkit.export.schedule import build_scheduler
    from dpkit.runtime import load_policy

    policy = load_policy(clip_runs[name], backend="torch")
    cfg = policy.policy.cfg
    assert (cfg.clip_sample, cfg.clip_sample_range) == ((True, 1.5) if name == "clip15" else (False, 1.0))
    sched = build_scheduler(policy.policy, ddim_steps=(10,))  # what the exporter writes into policy.json
    assert (sched["clip_sample"], sched["clip_sample_range"]) == (cfg.clip_sample, cfg.clip_sample_range)
    _check_clip(policy, ref, CLIP_VARIANTS[name][1])


@pytest.mark.parametrize("backend", ["ort", "cpp"])
@pytest.mark.parametrize("name", list(CLIP_VARIANTS))
def test_clip_variants_reproduce_lerobot_in_the_runtimes(bundle, ref, tmp_path, backend, name):
    """The clip rule lives in the sampler, not the graphs: the exported bundle with its scheduler's clip fields
    set as the variant's export writes them (test above) runs each runtime's reverse loop against lerobot."""
    from dpkit.runtime import load_policy

    if backend == "cpp":
        pytest.importorskip("dpkit.runtime._core")
    variant = shutil.copytree(bundle, tmp_path / "bundle")
    manifest = json.loads((variant / "policy.json").read_text())
    edit = CLIP_VARIANTS[name][0]
    manifest["scheduler"].update({k: v for k, v in edit.items()})
    (variant / "policy.json").write_text(json.dumps(manifest))
    _check_clip(load_policy(variant, backend=backend), ref, CLIP_VARIANTS[name][1])
