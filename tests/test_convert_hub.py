"""dpkit-convert with a Hugging Face hub repo id (issue 20), with no network at all.

The lerobot 0.6.1 fixture tests/data/peers/lerobot_keypoints_ngroups4_ddpm50 (processor files, real statistics)
is served by tests/hub_server.py, a stand-in for the hub's HTTP endpoints on 127.0.0.1 (HF_ENDPOINT), so the
temporary cache (HF_HUB_CACHE) is written by huggingface_hub's own snapshot_download in its own layout. The
CLI runs in a child process because huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE when it
is imported, as it does for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_server import HubServer, repo_files

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "peers" / "lerobot_keypoints_ngroups4_ddpm50"
REPO = "lerobot-test/diffusion_keypoints"
# What a lerobot save_pretrained folder holds (the local copy), and what the hub repo adds beside it.
LOCAL = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json",
         "policy_preprocessor_step_3_normalizer_processor.safetensors",
         "policy_postprocessor_step_0_unnormalizer_processor.safetensors")


def _repo() -> dict[str, bytes]:
    files = {k: v for k, v in repo_files(FIXTURE).items() if k in LOCAL}
    assert sorted(files) == sorted(LOCAL)
    # a hub repo carries more than the policy: none of it is fetched (only top-level *.json, *.safetensors)
    files["README.md"] = b"# a model card\n"
    files["reference.npz"] = (FIXTURE / "reference.npz").read_bytes()
    files["checkpoints/000100/pretrained_model/model.safetensors"] = b"not fetched"
    return files


def _convert(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME")}
    full.update(env, HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "dpkit.convert.cli", *args, "--no-progress"], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _state(run: Path) -> tuple[dict, dict]:
    from dpkit.train.checkpoint import load_checkpoint

    policy, state = load_checkpoint(run)
    return {k: v.clone() for k, v in policy.state_dict().items()}, state


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The hub stand-in, a cache filled from it once (online), and the local folder converted."""
    tmp = tmp_path_factory.mktemp("hub")
    files = _repo()
    local = tmp / "local"
    local.mkdir()
    for name in LOCAL:
        (local / name).write_bytes(files[name])
    with HubServer({REPO: files}) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp / "cache")}
        r = _convert([REPO, "--out", str(tmp / "online")], env)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # --no-progress: huggingface_hub's download bars are off too
        r = _convert([str(local), "--out", str(tmp / "from_local")], env)
        assert r.returncode == 0, r.stderr
        yield {"server": server, "env": env, "tmp": tmp, "local": local}


def test_cache_is_huggingface_hubs_own_layout_with_only_the_policy_files(hub):
    server, cache = hub["server"], Path(hub["env"]["HF_HUB_CACHE"])
    commit = server.commit(REPO)
    repo = cache / ("models--" + REPO.replace("/", "--"))
    assert (repo / "refs" / "main").read_text() == commit
    snapshot = repo / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(LOCAL)
    assert all((snapshot / n).is_symlink() or (snapshot / n).is_file() for n in LOCAL)
    assert not any(r.endswith(("README.md", "reference.npz")) or "/checkpoints/" in r
                   for r in server.requests if "/resolve/" in r)


def test_offline_hub_id_converts_to_the_same_run_as_the_local_folder(hub):
    tmp, env = hub["tmp"], {**hub["env"], "HF_HUB_OFFLINE": "1"}
    n = len(hub["server"].requests)
    out = tmp / "offline"
    r = _convert([REPO, "--out", str(out), "--json", str(tmp / "offline.json")], env)
    assert r.returncode == 0, r.stderr
    assert len(hub["server"].requests) == n  # HF_HUB_OFFLINE: nothing was sent
    assert f"{REPO}@{hub['server'].commit(REPO)[:12]}" in r.stdout

    w_hub, s_hub = _state(out)
    w_loc, s_loc = _state(tmp / "from_local")
    assert w_hub.keys() == w_loc.keys() and all(torch.equal(w_hub[k], w_loc[k]) for k in w_hub)
    assert s_hub["config"] == {**s_loc["config"], "name": s_hub["config"]["name"]}
    assert s_hub["normalizer"] == s_loc["normalizer"]
    src_hub, src_loc = s_hub["source"], s_loc["source"]
    assert src_hub["hub"]["repo_id"] == REPO and src_hub["hub"]["commit"] == hub["server"].commit(REPO)
    assert src_hub["hub"]["revision"] == "main" and src_hub["hub"]["cache"] == env["HF_HUB_CACHE"]
    assert {k: v for k, v in src_hub.items() if k not in ("path", "hub")} == \
        {k: v for k, v in src_loc.items() if k != "path"}  # same files, same sha256s
    # the online conversion (cold cache) is the same run too
    w_on, _ = _state(tmp / "online")
    assert all(torch.equal(w_on[k], w_loc[k]) for k in w_loc)


def test_offline_by_commit_and_a_revision_not_cached(hub):
    tmp, env = hub["tmp"], {**hub["env"], "HF_HUB_OFFLINE": "1"}
    r = _convert([REPO, "--revision", hub["server"].commit(REPO), "--out", str(tmp / "by_commit")], env)
    assert r.returncode == 0, r.stderr
    r = _convert([REPO, "--revision", "v2", "--out", str(tmp / "v2")], env)
    assert r.returncode == 1 and not (tmp / "v2").exists()
    assert r.stderr.strip() == (f"error: {REPO}@v2 is no local path and not in the hub cache {env['HF_HUB_CACHE']}, "
                                f"and HF_HUB_OFFLINE is set (fetch it once online, or give a local folder)")


def test_offline_and_not_cached_is_one_line_naming_the_id_and_the_cache(tmp_path):
    cache = tmp_path / "empty_cache"
    r = _convert(["lerobot/diffusion_pusht", "--out", str(tmp_path / "out")],
                 {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "lerobot/diffusion_pusht@main" in lines[0] and str(cache) in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_repo_revision_and_no_network_are_one_line(hub, tmp_path):
    env = {**hub["env"], "HF_HUB_CACHE": str(tmp_path / "cache")}
    cases = [
        (["lerobot-test/missing"], "lerobot-test/missing is neither a local path nor a model repo on the hub"),
        ([REPO, "--revision", "v9"], f"{REPO}: the hub has no revision 'v9'"),
        # nothing listens on port 9 (discard): a connection failure, and this cache does not hold the repo
        ([REPO], f"{REPO}@main is no local path, the hub at http://127.0.0.1:9 cannot be reached"),
    ]
    for i, (args, needle) in enumerate(cases):
        e = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"} if i == 2 else env
        r = _convert([*args, "--out", str(tmp_path / f"out{i}")], e)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr
        assert not (tmp_path / f"out{i}").exists()
    assert str(tmp_path / "cache") in lines[0]


def test_cached_repo_converts_when_the_hub_cannot_be_reached(hub):
    env = {**hub["env"], "HF_ENDPOINT": "http://127.0.0.1:9"}  # online mode, but no hub: the cache serves
    r = _convert([REPO, "--out", str(hub["tmp"] / "unreachable")], env)
    assert r.returncode == 0, r.stderr


def test_local_path_wins_over_a_hub_id_of_the_same_spelling(hub, tmp_path):
    # a folder spelled like the repo id, holding a different policy (other weights): the folder is converted
    work = tmp_path / "cwd"
    shutil.copytree(hub["local"], work / REPO)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(work / REPO / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("diffusion.unet."))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(work / REPO / "model.safetensors"), metadata={"format": "pt"})
    n = len(hub["server"].requests)
    r = _convert([REPO, "--out", "run"], hub["env"], cwd=work)
    assert r.returncode == 0, r.stderr
    assert len(hub["server"].requests) == n  # the hub was not asked
    _, state = _state(work / "run")
    assert "hub" not in state["source"] and state["source"]["path"] == str((work / REPO).resolve())
    r = _convert([REPO, "--revision", "main", "--out", "run2"], hub["env"], cwd=work)
    assert r.returncode == 1 and "--revision is for a hub repo id" in r.stderr and not (work / "run2").exists()


def test_repo_id_spelling():
    from dpkit.convert.hub import is_repo_id

    assert is_repo_id("lerobot/diffusion_pusht") and is_repo_id("a/b.c-d_e")
    for text in ("diffusion_pusht", "a/b/c", "/abs/path", "./x/y", "a--b/c", "a/b..c", "-a/b", "x/latest.ckpt", ""):
        assert not is_repo_id(text), text
