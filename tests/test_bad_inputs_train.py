"""Bad input on the training side gets one clear line, a non-zero exit, and nothing written half.

Config values out of range or of the wrong JSON type, a run folder that cannot be written, a damaged or
mismatched resume state, a damaged dataset or converted config, and the temp folders killed writers leave
behind. The checks run before the data loads: where that
matters, the trainer's `load_datasets` is replaced by one that fails the test if it is reached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dpkit.train.trainer as trainer_mod
from dpkit.errors import DpkitError
from dpkit.io import atomic_dir, atomic_write_text, check_writable_dir, remove_stale_temps
from dpkit.train import checkpoint as ckpt_io
from dpkit.train.cli import main as train_main
from dpkit.train.config import Config, DataConfig, DistillConfig, PolicyConfig, TrainConfig, load_config, resnet_groups
from dpkit.train.trainer import train
from synthetic import SMALL_TRAIN as SMALL



@pytest.fixture(scope="module")
def store(train_store) -> Path:
    return train_store


@pytest.fixture(scope="module")
def trained_run(store, tmp_path_factory) -> Path:
    """A 2-step run (read-only for the tests: copy it before damaging it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(load_config("tiny", [*SMALL, f"data.path={store}", "train.steps=2"]), run, progress=False)
    return run


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the trainer reaches its data loading."""

    def refuse(*a, **kw):
        raise AssertionError("the data was loaded before the bad input was found")

    monkeypatch.setattr(trainer_mod, "load_datasets", refuse)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return e.value.code, err


def _one_line(err: str, fragment: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- config: every field has a validated range -------------------------------------------------------

# One bad value per field (some fields more): each must be refused with a message naming the field.
BAD_VALUES = {
    "name": [("a/b", "name must be a plain folder name")],
    "policy.obs_mode": [("rgb", "policy.obs_mode")],
    "policy.n_obs_steps": [(0, "policy.n_obs_steps must be in [1, 1024]")],
    "policy.horizon": [(2048, "policy.horizon must be in [1, 1024]"), (4, "policy.horizon (4) must be >=")],
    "policy.n_action_steps": [(0, "policy.n_action_steps must be in [1, 1024]")],
    "policy.action_dim": [(3, "policy.action_dim must be 2")],
    "policy.crop_size": [(32, "policy.crop_size must be in [33, 96]"), (97, "policy.crop_size")],
    "policy.resnet_width": [(4, "policy.resnet_width must be in [8, 256]"), (50, "GroupNorm groups")],
    "policy.encoder_norm": [("layer", "policy.encoder_norm must be one of group, batch")],
    "policy.spatial_softmax_keypoints": [(0, "policy.spatial_softmax_keypoints must be in [1,")],
    "policy.image_feature_dim": [(0, "policy.image_feature_dim must be in [1,")],
    "policy.down_dims": [("[]", "policy.down_dims must not be empty"), ("[16,0]", "policy.down_dims entry"),
                         ("[8,8,8,8,8,8]", "policy.down_dims has 6 levels; horizon 16 allows at most 5")],
    "policy.kernel_size": [(-1, "policy.kernel_size must be a positive odd number"), (4, "positive odd")],
    "policy.n_groups": [(0, "policy.n_groups must be in [1,"), (7, "not divisible by n_groups=7")],
    "policy.final_norm_groups": [(0, "policy.final_norm_groups must be in [1, 4096]"),
                                  (12, "policy.final_norm_groups=12 does not divide down_dims[0]=64")],
    "policy.diffusion_step_embed_dim": [(15, "policy.diffusion_step_embed_dim must be even")],
    "policy.skip_connection": [("mul", "policy.skip_connection")],
    "policy.num_train_timesteps": [(1, "policy.num_train_timesteps must be in [2, 1000]"), (5000, "[2, 1000]")],
    "policy.beta_schedule": [("sigmoid", "policy.beta_schedule must be one of")],
    "policy.clip_sample": [(1, "policy.clip_sample must be true or false")],
    "policy.fewstep_later_epsilon": [(1, "policy.fewstep_later_epsilon must be true or false"),
                                     ("true", "policy.fewstep_later_epsilon is for a few-step student")],
    "policy.clip_sample_range": [(0, "policy.clip_sample_range must be > 0"), (".inf", "must be a finite number")],
    "policy.prediction_type": [("v_prediction", "policy.prediction_type must be 'epsilon' or 'sample'")],
    "policy.ddim_steps": [(101, "policy.ddim_steps must be in [1, num_train_timesteps]")],
    "policy.ddpm_steps": [(0, "policy.ddpm_steps must be in [1, num_train_timesteps]"), ("ten", "expects a number")],
    "policy.obs_keys": [("[obs,obs]", "policy.obs_keys has a repeated name"), ("[a-b]", "must be identifiers")],
    "policy.obs_dims": [("[3]", "policy.obs_dims must give one size per vector observation")],
    "policy.image_mean": [("[.nan,0,0]", "policy.image_mean[0] must be a finite number")],
    "policy.image_std": [("[0,1,1]", "policy.image_std must be positive")],
    "policy.default_sampler": [("euler", "policy.default_sampler must be 'ddim', 'ddpm' or 'fewstep'"),
                               ("fewstep", "policy.default_sampler 'fewstep' needs policy.fewstep_timesteps")],
    "policy.fewstep_timesteps": [("[49,99]", "policy.fewstep_timesteps must be distinct, descending"),
                                 ("[100]", "in [0, num_train_timesteps=100), got [100]"),
                                 ("[]", "policy.fewstep_timesteps must be a list of 1 to 16 integers"),
                                 ("[99]", "policy.fewstep_timesteps (a few-step student) needs prediction_type "
                                          "'sample' and default_sampler 'fewstep'")],
    "data.path": [("''", "data.path must be a dataset path or null")],
    "data.val_ratio": [(1, "data.val_ratio must be in [0, 1)"), (".nan", "data.val_ratio must be a finite number")],
    "data.max_train_episodes": [(0, "data.max_train_episodes must be >= 1")],
    "data.split_seed": [(-1, "data.split_seed must be in [0, 9223372036854775807]"), (2**63, "data.split_seed")],
    "data.split": [("random", "data.split must be one of dpkit, original")],
    "data.normalizer_episodes": [("val", "data.normalizer_episodes must be one of train, all")],
    "data.num_workers": [(-1, "data.num_workers must be in [0, 128]")],
    "train.steps": [(0, "train.steps must be >= 1")],
    "train.batch_size": [(0, "train.batch_size must be >= 1")],
    "train.lr": [(0, "train.lr must be in (0, 1]"), (".inf", "train.lr must be a finite number")],
    "train.betas": [("[1.0,0.9]", "train.betas must be two numbers in [0, 1)")],
    "train.weight_decay": [(-1, "train.weight_decay must be >= 0")],
    "train.lr_scheduler": [("step", "train.lr_scheduler must be one of")],
    "train.lr_warmup_steps": [(-5, "train.lr_warmup_steps must be >= 0")],
    "train.grad_accum_steps": [(0, "train.grad_accum_steps must be >= 1")],
    "train.mixed_precision": [("fp8", "train.mixed_precision")],
    "train.ema": [(1, "train.ema must be true or false")],
    "train.ema_power": [(-1, "train.ema_power must be > 0")],
    "train.ema_max_decay": [(1, "train.ema_max_decay must be in (0, 1)")],
    "train.seed": [(-1, "train.seed must be in [0, 9223372036854775807]"), (2**63, "train.seed")],
    "train.time_limit_s": [(-1, "train.time_limit_s must be >= 0")],
    "train.log_every": [(0, "train.log_every must be >= 1")],
    "train.val_every": [(0, "train.val_every must be >= 1")],
    "train.val_batches": [(0, "train.val_batches must be >= 1")],
    "train.checkpoint_every": [(0, "train.checkpoint_every must be >= 1")],
    "train.keep_checkpoints": [(0, "train.keep_checkpoints must be >= 1")],
    "train.eval_every": [(-1, "train.eval_every must be >= 0")],
    "train.eval_episodes": [(0, "train.eval_episodes must be in [1, 10000]")],
    "train.eval_max_steps": [(0, "train.eval_max_steps must be >= 1")],
    "train.eval_start": [(-1, "train.eval_start must be >= 0")],
    "train.eval_samplers": [("[ddim]", "train.eval_samplers entry 'ddim' is not SAMPLER-K"),
                            ("[ddim-10,ddim:10]", "train.eval_samplers lists a sampler twice"),
                            ("ddim-10", "train.eval_samplers must be a list")],
    "train.eval_last": [(0, "train.eval_last must be in [1, 10000]")],
    "distill.teacher": [("' '", "distill.teacher must be a run folder or null")],
    "distill.timesteps": [("[49,99]", "distill.timesteps must be 1 to 16 distinct, descending timesteps >= 0"),
                          ("[-1]", "distill.timesteps must be 1 to 16 distinct, descending timesteps >= 0")],
    "distill.teacher_ddim_steps": [(0, "distill.teacher_ddim_steps must be in [1, 1000]")],
    "distill.draws_per_window": [(-1, "distill.draws_per_window must be in [0, 1000]")],
    "distill.unexecuted_weight": [(1.5, "distill.unexecuted_weight must be in [0.0, 1.0]")],
    "distill.pseudo_huber": [(-0.1, "distill.pseudo_huber must be in [0.0, 10.0]")],
    "distill.later_inputs": [("path", "distill.later_inputs must be one of noised_actions, teacher_path, student, got 'path'")],
    "distill.rollout_at": [("[300,200]", "distill.rollout_at must be distinct, ascending optimizer steps >= 1"),
                           ("[0]", "distill.rollout_at must be distinct, ascending optimizer steps >= 1")],
    "distill.rollout_episodes": [(0, "distill.rollout_episodes must be in [1, 100000]")],
    "distill.rollout_calls": [(3, "distill.rollout_calls must be in [1, len(distill.timesteps)]")],
    "distill.rollout_fraction": [(1.5, "distill.rollout_fraction must be in [0.0, 1.0]")],
    "distill.energy_weight": [(-1.0, "distill.energy_weight must be in [0.0, 100.0]")],
    "distill.energy_rows": [(0, "distill.energy_rows must be in [1, 100000]")],
    "distill.energy_samples": [(1, "distill.energy_samples must be in [2, 64]"), (65, "must be in [2, 64], got 65")],
    "distill.energy_from": [(-1, "distill.energy_from must be in [0, 10000000]")],
    "distill.later_inputs_from": [(-1, "distill.later_inputs_from must be in [0, 10000000]")],
    "distill.later_epsilon": [(1, "distill.later_epsilon must be true or false")],
    "distill.rollout_seed_start": [(100_001, "must lie in [0, 100000]: the rollouts never start from the test seeds"),
                                   (-1, "must lie in [0, 100000]")],
}


def test_every_config_field_has_a_bad_value_case():
    fields = {"name"}
    for prefix, cls in (("policy", PolicyConfig), ("data", DataConfig), ("train", TrainConfig),
                        ("distill", DistillConfig)):
        fields |= {f"{prefix}.{f.name}" for f in dataclasses.fields(cls)}
    assert set(BAD_VALUES) == fields  # a new field needs a range and a case here


@pytest.mark.parametrize("key,value,message", [(k, v, m) for k, cases in BAD_VALUES.items() for v, m in cases])
def test_bad_config_value_is_refused(key, value, message):
    with pytest.raises(DpkitError, match=re.escape(message)):
        load_config("tiny", [f"{key}={value}"])


def test_named_configs_and_their_round_trip_are_valid():
    for name in ("tiny", "pusht_lowdim", "pusht_lowdim_cpu", "pusht_image"):
        cfg = load_config(name)
        assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_edge_values_that_pass_build_and_run():
    """The bounds are not tighter than the model: edge configs that pass validation build and run."""
    from dpkit.train.normalizer import Normalizer
    from dpkit.train.policy import DiffusionPolicy

    rng = np.random.default_rng(0)
    cfg = load_config("tiny", ["policy.horizon=10", "policy.n_action_steps=9", "policy.down_dims=[8,8,8,8]",
                               "policy.kernel_size=1", "policy.n_groups=1", "policy.diffusion_step_embed_dim=2"])
    norm = Normalizer.fit({"action": rng.uniform(20, 500, (50, 2)), "obs": rng.uniform(20, 500, (50, 20))})
    policy = DiffusionPolicy(cfg.policy, norm)
    batch = {"obs": {"obs": torch.rand(2, 2, 20) * 400}, "action": torch.rand(2, 10, 2) * 400}
    assert torch.isfinite(policy(batch))


def test_resnet_width_rule_matches_the_encoder():
    """`resnet_groups` (used by the config check) is the rule the ResNet's GroupNorms apply."""
    from dpkit.train.vision import ResNet18Trunk

    for width in range(8, 81):
        ok = all(c % resnet_groups(c) == 0 for c in (width, 2 * width, 4 * width, 8 * width))
        try:
            with torch.device("meta"):
                ResNet18Trunk(width)
            built = True
        except ValueError:
            built = False
        assert ok == built, width
        accepted = True
        try:
            load_config("tiny", [f"policy.resnet_width={width}"])
        except DpkitError:
            accepted = False
        assert accepted == built, width


@pytest.mark.parametrize("override,message", [
    ("policy.n_groups=0", "policy.n_groups"),
    ("policy.kernel_size=-1", "policy.kernel_size"),
    ("data.split_seed=-1", "data.split_seed"),
    ("train.val_batches=0", "train.val_batches"),
    ("train.lr_warmup_steps=-5", "train.lr_warmup_steps"),
])
def test_cli_bad_override_fails_before_anything(store, tmp_path, capsys, no_data, override, message):
    run = tmp_path / "run"
    rc, err = _cli(capsys, "--config", "tiny", "--data", store, "--out", run, "--no-progress", *SMALL, override)
    assert rc == 1
    _one_line(err, message)
    assert not run.exists()


def test_python_api_validates_an_edited_config(store, tmp_path, no_data):
    cfg = load_config("tiny", [*SMALL, f"data.path={store}"])
    cfg.train.val_batches = 0  # once failed after training, with no checkpoint
    with pytest.raises(DpkitError, match="train.val_batches must be >= 1"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ---- the run folder --------------------------------------------------------------------------------


def test_out_below_a_file_or_unwritable_fails_before_the_data(store, tmp_path, capsys, no_data, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    base = ["--config", "tiny", "--data", store, "--no-progress", *SMALL]
    rc, err = _cli(capsys, *base, "--out", blocker / "run")
    assert rc == 1
    _one_line(err, f"cannot create run folder {blocker / 'run'}: {blocker} is not a folder")
    rc, err = _cli(capsys, *base, "--out", blocker)
    assert rc == 1
    _one_line(err, "it is not a folder")
    assert blocker.read_text() == "not a folder"

    if sys.platform.startswith("linux") and Path("/proc/self").is_dir():
        rc, err = _cli(capsys, *base, "--out", "/proc/self/dpkit_run")  # procfs: no new files, even for root
        assert rc == 1
        _one_line(err, "run folder /proc/self/dpkit_run is not writable")

    # A read-only mount: permission bits do not show it (and root passes them), so the check really writes.
    ro = tmp_path / "readonly"
    ro.mkdir()
    real_open = os.open

    def open_ro(path, flags, *a, **kw):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", open_ro)
    rc, err = _cli(capsys, *base, "--out", ro / "run")
    assert rc == 1
    _one_line(err, f"run folder {ro / 'run'} is not writable: Read-only file system")
    with pytest.raises(DpkitError, match="Read-only file system"):  # the Python API checks too
        train(load_config("tiny", [*SMALL, f"data.path={store}"]), ro / "run2", progress=False)
    monkeypatch.setattr(os, "open", real_open)
    assert list(ro.iterdir()) == []  # the probes left nothing


def test_check_writable_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    assert check_writable_dir(target) == target
    assert list(tmp_path.iterdir()) == []


# ---- resume and export with a damaged or mismatched checkpoint ---------------------------------------


def _damage_trainer_state(ck: Path, how: str) -> None:
    path = ck / "trainer_state.pt"
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
        return
    ts = torch.load(path, weights_only=True)
    if how == "a tensor":
        ts = torch.zeros(3)
    elif how == "missing scheduler":
        del ts["scheduler"]
    elif how == "optimizer without param_groups":
        del ts["optimizer"]["param_groups"]
    elif how == "another step":
        ts["scheduler"]["last_epoch"] = 7
    elif how == "fewer parameter groups":
        ts["optimizer"]["param_groups"] = []
    elif how == "wrong moment shape":
        first = next(iter(ts["optimizer"]["state"]))
        ts["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3, 3)
    torch.save(ts, path)


@pytest.mark.parametrize("how,message", [
    ("random bytes", "trainer_state.pt is corrupt or truncated"),
    ("a tensor", "trainer_state.pt is not a dpkit trainer state: expected a dict"),
    ("missing scheduler", "'scheduler' missing or not a dict"),
    ("optimizer without param_groups", "'optimizer' lacks its 'state' dict or 'param_groups' list"),
    ("another step", "trainer_state.pt is from step 7, but state.json says step 2"),
    ("fewer parameter groups", "does not match this run's model and optimizer"),
    ("wrong moment shape", "optimizer state 'exp_avg' of parameter 0 has shape (3, 3)"),
])
def test_resume_with_a_bad_trainer_state(trained_run, tmp_path, capsys, no_data, how, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _damage_trainer_state(run / "checkpoints" / "step_000002", how)
    before = _snapshot(run)
    rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress")
    assert rc == 1
    _one_line(err, message)
    assert _snapshot(run) == before  # metrics.jsonl and the checkpoint untouched
    # The exporter loads only weights and state.json: a damaged optimizer state does not stop it.
    policy, state = ckpt_io.load_checkpoint(run)
    assert state["step"] == 2


@pytest.mark.parametrize("key,value,message", [
    ("step", "abc", "'step' must be an integer >= 0, got 'abc'"),
    ("step", 5, "says step 5 but its folder is step_000002"),
    ("step", True, "'step' must be an integer"),
    ("ema_updates", -1, "'ema_updates' must be an integer >= 0"),
    ("world_size", 0, "'world_size' must be an integer >= 1"),
    ("best_score", "high", "'best_score' must be a number or null"),
    ("normalizer", [], "'normalizer' must be an object, got a list"),
])
def test_bad_state_json_counters(trained_run, tmp_path, capsys, no_data, key, value, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(path.read_text())
    state[key] = value
    path.write_text(json.dumps(state))
    rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress")
    assert rc == 1
    _one_line(err, message)
    with pytest.raises(DpkitError, match=re.escape(message)):
        ckpt_io.load_checkpoint(run)  # what dpkit-export loads
    if key == "step" and value == "abc":
        from dpkit.export.cli import main as export_main

        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            export_main([str(run), "--out", str(tmp_path / "bundle")])
        assert e.value.code == 1
        _one_line(capsys.readouterr().err, message)
        assert not (tmp_path / "bundle").exists()


def test_resume_refuses_optimizer_settings_it_would_ignore(trained_run, tmp_path, capsys, no_data):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for override in ("train.lr=0.5", "train.betas=[0.9,0.99]", "train.weight_decay=0.1"):
        rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress", override)
        assert rc == 1
        _one_line(err, f"--resume cannot change {override.split('=')[0]}")


# ---- temp folders of killed writers ------------------------------------------------------------------


def _killed_writer(code: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr


def test_killed_writers_leave_temps_that_the_next_write_removes(tmp_path):
    # A writer killed inside atomic_dir leaves its temp folder behind...
    _killed_writer("import os\nfrom dpkit.io import atomic_dir\nwith atomic_dir('bundle') as t:\n"
                   "    (t / 'policy.json').write_text('{')\n    os._exit(9)", tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and (tmp_path / left[0] / "policy.json").is_file(), left
    m = re.match(r"^\.bundle\.dpkit-([0-9a-f]{8})-(\d+)-[0-9a-f]+\.tmp$", left[0])
    assert m, left
    host = m.group(1)
    # ... which the next write into the folder removes (here a file write, itself killed before its rename,
    # which leaves its own temp file).
    _killed_writer("import os, dpkit.io as io\nio.os.replace = lambda *a: os._exit(9)\n"
                   "io.atomic_write_text('metrics.jsonl', 'x')", tmp_path)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".metrics.jsonl.dpkit-") and left[0].endswith(".tmp"), left

    # ... beside entries that are not stale: a live process's, a recent one from another host, and
    # files that merely look alike. An old one from another host is stale whoever made it.
    live = tmp_path / f".step_000004.dpkit-{host}-{os.getppid()}-ab12.tmp"
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    remote = tmp_path / f".step_000005.dpkit-{other_host}-999999-cd34.tmp"
    old_remote = tmp_path / f".step_000006.dpkit-{other_host}-999999-ef56.tmp"
    lookalike = tmp_path / ".notes.tmp"
    for d in (live, remote, old_remote):
        d.mkdir()
    lookalike.write_text("mine")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old_remote, (day_ago, day_ago))

    with atomic_dir(tmp_path / "bundle2") as t:
        (t / "policy.json").write_text("{}")
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"bundle2", live.name, remote.name, lookalike.name}
    assert (tmp_path / "bundle2").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700

    # The file writer cleans up the same way; nothing of its own is left.
    live.rmdir()
    dead = tmp_path / f".latest.dpkit-{host}-{_dead_pid()}-0a0a.tmp"
    dead.write_text("half")
    atomic_write_text(tmp_path / "latest", "step_000001\n")
    assert not dead.exists() and (tmp_path / "latest").read_text() == "step_000001\n"
    assert remove_stale_temps(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_after_a_killed_checkpoint_write(trained_run, tmp_path, capsys):
    """A checkpoint write killed mid-way leaves a temp folder; the next run's checkpoint removes it."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _killed_writer("import os\nfrom dpkit.io import atomic_dir\nwith atomic_dir('step_000003') as t:\n"
                   "    (t / 'state.json').write_text('{')\n    os._exit(9)", run / "checkpoints")
    assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".step_000003.")]
    rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress")
    assert rc == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]
    assert ckpt_io.read_state(run / "checkpoints" / "step_000003")["step"] == 3


def test_constant_lr_schedule_warms_up(store, tmp_path):
    """diffusers' plain "constant" would skip the warm-up the config asks for."""
    cfg = load_config("tiny", [*SMALL, f"data.path={store}", "train.steps=3", "train.lr_scheduler=constant",
                               "train.lr=0.001"])
    train(cfg, tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([0.0005, 0.001, 0.001])


# ---- end to end, as a user runs it -----------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["policy.n_groups=0"], "bad config: policy.n_groups must be in [1, 4096], got 0"),
    (["--out", "{tmp}/afile/run"], "is not a folder"),
])
def test_dpkit_train_subprocess_one_line(tmp_path, extra, message):
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "dpkit.train.cli", "--config", "tiny", "--data", str(tmp_path / "missing.zarr"),
           "--no-progress", *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()  # and found before the (missing) data was looked at


# ---- the dataset ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how,message", [
    ("group", "meta/episode_ends is a group, expected an array"),
    ("text", "meta/episode_ends has dtype"),
])
def test_episode_ends_that_is_not_a_numeric_array(store, tmp_path, capsys, how, message):
    import zarr

    data = tmp_path / "pusht.zarr"
    shutil.copytree(store, data)
    g = zarr.open_group(str(data), mode="r+")
    del g["meta/episode_ends"]
    if how == "group":  # once an AttributeError traceback
        g.create_group("meta/episode_ends")
    else:
        g.create_array("meta/episode_ends", shape=(2,), dtype=str)
    rc, err = _cli(capsys, "--config", "tiny", "--data", data, "--out", tmp_path / "run", "--no-progress", *SMALL)
    assert rc == 1
    _one_line(err, message)
    assert not (tmp_path / "run").exists()


# ---- strict JSON types, and option combinations that would do nothing ---------------------------------------


@pytest.mark.parametrize("section,key,value,message", [
    ("policy", "horizon", "16", 'policy.horizon must be an integer, got "16" (str)'),
    ("policy", "horizon", 16.0, "policy.horizon must be an integer, got 16.0 (float)"),
    ("policy", "num_train_timesteps", "100", 'policy.num_train_timesteps must be an integer, got "100" (str)'),
    ("policy", "down_dims", [32, 64.0], "policy.down_dims[1] must be an integer, got 64.0"),
    ("train", "batch_size", True, "train.batch_size must be an integer, got true (bool)"),
    ("train", "lr", "1e-3", 'train.lr must be a number, got "1e-3" (str)'),
])
def test_state_json_config_values_must_have_their_json_type(trained_run, tmp_path, capsys, no_data, section, key,
                                                            value, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(path.read_text())
    state["config"][section][key] = value
    path.write_text(json.dumps(state))
    before = _snapshot(run)
    rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress")
    assert rc == 1
    _one_line(err, message)
    assert _snapshot(run) == before
    with pytest.raises(DpkitError, match=re.escape(message)):
        ckpt_io.load_checkpoint(run)  # what dpkit-export loads


def test_json_numbers_keep_loading_and_overrides_stay_text(trained_run):
    state = json.loads((trained_run / "checkpoints" / "step_000002" / "state.json").read_text())
    state["config"]["train"]["lr"] = 1  # a JSON integer is a number
    assert Config.from_dict(state["config"]).train.lr == 1.0
    # key=value overrides and YAML files are text: "1e-3" (YAML 1.1 reads it as a string) is a number there
    assert load_config("tiny", ["train.lr=1e-3", "policy.horizon=16.0"]).policy.horizon == 16


def test_negative_normalizer_scale_in_state_json_is_refused(trained_run, tmp_path, capsys, no_data):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    path = run / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(path.read_text())
    state["normalizer"]["action"]["scale"][0] = -5.0
    path.write_text(json.dumps(state))
    rc, err = _cli(capsys, "--out", run, "--resume", "--steps", "3", "--no-progress")
    assert rc == 1
    _one_line(err, "normalizer action.scale must be > 0")


@pytest.mark.parametrize("overrides,message", [
    # once: exit 0 with no evaluation and no word
    (["train.eval_every=5", "train.eval_start=1000"],
     "train.eval_every=5 from train.eval_start=1000 runs no evaluation in train.steps=6 "
     "(the first would be at step 1000)"),
    (["train.eval_every=7"], "(the first would be at step 7)"),
    # once: trained until the first evaluation, then stopped without that step's checkpoint
    (["train.eval_every=2", "train.eval_samplers=[ddim-10,ddpm-1000]"],
     "train.eval_samplers entry 'ddpm-1000': ddpm takes at most policy.num_train_timesteps=100 steps"),
])
def test_train_evaluation_that_could_not_run_is_refused_before_the_data(store, tmp_path, capsys, no_data, overrides,
                                                                        message):
    run = tmp_path / "run"
    rc, err = _cli(capsys, "--config", "tiny", "--data", store, "--out", run, "--no-progress", "--steps", "6", *SMALL,
                   *overrides)
    assert rc == 1
    _one_line(err, message)
    assert not run.exists()


def test_evaluations_that_fit_are_accepted():
    cfg = load_config("tiny", ["train.eval_every=5", "train.eval_start=3", "train.steps=5",
                               "train.eval_samplers=[ddpm-100]"])
    assert cfg.train.eval_every == 5 and cfg.train.eval_samplers == ("ddpm-100",)
    for name in ("pusht_lowdim_cpu",):  # the shipped protocol config (evaluations from step 7,500 of 12,000)
        load_config(name)


# ---- a converted policy's config.json and statistics --------------------------------------------------------


def _lerobot_source(tmp_path: Path) -> Path:
    from test_convert_lerobot_more import BN, _source

    return _source(BN, tmp_path / "src")


@pytest.mark.parametrize("field,value,message", [
    ("horizon", "16", 'policy.horizon must be an integer, got "16" (str)'),
    ("horizon", 16.0, "policy.horizon must be an integer, got 16.0 (float)"),
    ("num_train_timesteps", "100", 'policy.num_train_timesteps must be an integer, got "100" (str)'),
    ("n_obs_steps", True, "policy.n_obs_steps must be an integer, got true (bool)"),
])
def test_lerobot_config_json_values_must_have_their_json_type(tmp_path, capsys, field, value, message):
    from test_convert import _refused

    src = _lerobot_source(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(capsys, [str(src)], tmp_path / "out", "config.json does not fit dpkit's model", message)


@pytest.mark.parametrize("feature,mapping,message", [
    ("observation.image", {}, "observation.image.std statistics must be > 0, got -5"),
    ("action", {"ACTION": "MEAN_STD"}, "action.std statistics must be > 0, got -5"),
    ("action", {"ACTION": "MEAN_STD", "zero": True}, "action.std statistics must be > 0, got 0"),
])
def test_lerobot_mean_std_with_a_std_that_is_not_positive_is_refused(tmp_path, capsys, feature, mapping, message):
    from safetensors.torch import load_file, save_file
    from test_convert import _refused

    src = _lerobot_source(tmp_path)
    mapping = dict(mapping)
    zero = mapping.pop("zero", False)
    cfg = json.loads((src / "config.json").read_text())
    cfg["normalization_mapping"].update(mapping)
    (src / "config.json").write_text(json.dumps(cfg))
    name = ("policy_postprocessor_step_0_unnormalizer_processor.safetensors" if feature == "action" else
            "policy_preprocessor_step_3_normalizer_processor.safetensors")
    tensors = load_file(str(src / name))
    tensors[f"{feature}.std"].view(-1)[0] = 0.0 if zero else -5.0
    save_file(tensors, str(src / name))
    _refused(capsys, [str(src)], tmp_path / "out", message)


# ---- one writer per run or output folder ----------------------------------------------------------------------


HOLD = """
import sys, time
from dpkit.io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s writer lock (as a dpkit-train, -export or -convert would)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_writer_of_a_folder_is_refused_naming_the_holder(trained_run, tmp_path, capsys, no_data):
    from dpkit.convert.cli import main as convert_main
    from dpkit.export.cli import main as export_main
    from dpkit.io import folder_lock, lock_path

    run, bundle, converted = tmp_path / "run", tmp_path / "bundle", tmp_path / "converted"
    shutil.copytree(trained_run, run)
    before = _snapshot(run)
    holders = [_holder(f) for f in (run, bundle, converted)]
    try:
        for argv in (["--out", run, "--resume", "--steps", "3"], ["--config", "tiny", "--out", run, "--force"]):
            rc, err = _cli(capsys, *argv, "--no-progress")  # once: two --resume both ran, duplicating steps
            assert rc == 1
            _one_line(err, f"run folder {run} is being written by another process (pid {holders[0].pid}, lock ")
        assert _snapshot(run) == before
        source = tmp_path / "source"
        for main, argv, holder in ((export_main, [run, "--out", bundle], holders[1]),
                                   (convert_main, [source, "--out", converted, "--no-progress"], holders[2])):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main([str(a) for a in argv])
            assert e.value.code == 1
            _one_line(capsys.readouterr().err, f"is being written by another process (pid {holder.pid}")
        assert not bundle.exists() and not converted.exists()
    finally:
        for h in holders:
            h.kill()  # SIGKILL: no cleanup, the lock files stay behind
            h.wait()
    assert lock_path(run).is_file()  # a killed writer's lock file ...
    with folder_lock(run):  # ... is taken over (flock died with its process)
        pass
    assert not lock_path(run).exists()  # a released lock leaves nothing behind
    with pytest.raises(AssertionError, match="the data was loaded"):  # past the lock: no_data stops it there
        train_main([str(a) for a in ("--out", run, "--resume", "--steps", "3", "--no-progress")])


def test_a_result_published_by_another_writer_meanwhile_is_not_replaced(tmp_path):
    final = tmp_path / "bundle"
    with pytest.raises(DpkitError, match="appeared while this result was being written"):
        with atomic_dir(final) as tmp:
            (tmp / "mine").write_text("mine")
            final.mkdir()  # another writer (without the lock) finished first
            (final / "theirs").write_text("theirs")
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # the temp folder is gone


def test_two_dpkit_train_processes_on_one_run_folder(store, tmp_path):
    from dpkit.io import lock_path

    run = tmp_path / "run"
    base = [sys.executable, "-m", "dpkit.train.cli", "--config", "tiny", "--data", str(store), "--out", str(run),
            "--no-progress", *SMALL]
    first = subprocess.Popen([*base, "--steps", "100000"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (lock_path(run).is_file() and lock_path(run).read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first dpkit-train never took the lock"
            time.sleep(0.2)
        second = subprocess.run([*base, "--force", "--steps", "5"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith("error: ") and second.stderr.count("\n") == 1, second.stderr
        assert f"is being written by another process (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
