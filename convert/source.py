"""Which peer format a path is, and the conversion itself (the library side of `dpkit-convert`).

    from dpkit.convert.source import convert_policy
    summary = convert_policy("path/to/pretrained_model", "runs/lerobot_pusht")   # or path/to/latest.ckpt

A folder with a lerobot `config.json` (`"type": "diffusion"`) is a lerobot policy; a file that is a torch
zip archive is an original diffusion_policy checkpoint (a folder holding exactly one `.ckpt`, or a
`checkpoints/latest.ckpt`, is taken as that file). A source that is no local path but is spelled like a
Hugging Face hub repo id ("lerobot/diffusion_pusht", optionally at `revision`) is fetched into the hub's
cache first (dpkit.convert.hub); a local path that exists always wins. Anything else is refused with what
was expected.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

from dpkit.errors import DpkitError
from dpkit.io import folder_lock


def detect_source(path: str | Path) -> tuple[str, Path]:
    """("lerobot" | "diffusion_policy", the folder or file to read)."""
    p = Path(path)
    if not p.exists():
        raise DpkitError(f"{p} does not exist")
    if p.is_dir():
        if (p / "config.json").is_file():
            from dpkit.convert.lerobot import read_json

            cfg = read_json(p / "config.json")  # bounded nesting, one-line errors
            if not isinstance(cfg, dict) or cfg.get("type") != "diffusion":
                kind = cfg.get("type") if isinstance(cfg, dict) else type(cfg).__name__
                raise DpkitError(f"{p / 'config.json'}: type {kind!r} is not a lerobot diffusion policy "
                                 f"(only \"type\": \"diffusion\" converts)")
            return "lerobot", p
        ckpts = sorted(p.glob("*.ckpt")) or sorted(p.glob("checkpoints/latest.ckpt"))
        if len(ckpts) == 1:
            return "diffusion_policy", ckpts[0]
        raise DpkitError(f"{p} is neither a lerobot pretrained policy folder (config.json + model.safetensors) "
                         f"nor a diffusion_policy checkpoint (.ckpt)")
    if zipfile.is_zipfile(p):
        return "diffusion_policy", p
    raise DpkitError(f"{p} is neither a lerobot pretrained policy folder nor a diffusion_policy .ckpt "
                     f"(torch zip archive)")


def _auto_reference(source: str | Path, path: Path, kind: str) -> Path:
    """`check="auto"`: the reference.npz in the source folder or beside its checkpoint, else a one-line refusal."""
    from dpkit.convert.check import find_reference, peer_framework

    found = find_reference(source) or find_reference(path)
    if found is None:
        live = peer_framework(kind)
        why = (f"{', '.join(live)} is importable here, but a live comparison against it is not implemented"
               if live else f"{'lerobot' if kind == 'lerobot' else 'diffusion_policy'} is not importable here")
        raise DpkitError(f"--check auto: no reference.npz in or beside {source} ({why}); pass --check REFERENCE.npz")
    return found


def convert_policy(source: str | Path, out: str | Path, *, ema: bool = True, force: bool = False,
                   progress: Callable[[str], None] | None = None, revision: str | None = None,
                   download_progress: bool = True, check: str | Path | None = None) -> dict[str, Any]:
    """Convert `source` (a path, or a hub repo id at `revision`) into the dpkit run folder `out`; returns a
    summary (also what --json writes). `download_progress`: huggingface_hub's own bars while fetching.

    `check`: a peer reference.npz, or "auto" (the one in the source folder / beside the checkpoint): the
    converted policy is run on its observations and noise and compared with the peer's recorded outputs
    (dpkit.convert.check); a failed check raises DpkitError (one line: the error and the bound) and nothing
    is written at `out`. The result is recorded in the run's source record and the summary ("check")."""
    from dpkit.convert.check import read_reference
    from dpkit.convert.hub import fetch_repo, is_repo_id
    from dpkit.convert.lerobot import read_lerobot
    from dpkit.convert.original import read_original
    from dpkit.convert.run import check_out, write_run

    out = Path(out)
    check_out(out, force)  # before any reading: a refused --out costs nothing
    reference = None
    if check is not None and str(check) != "auto":
        reference = read_reference(check)  # a bad reference is refused before the conversion
    hub = None
    if is_repo_id(source):
        (progress or (lambda _msg: None))(f"fetching {source} from the hub")
        source, hub = fetch_repo(str(source), revision, progress=download_progress)
    elif revision is not None:
        raise DpkitError(f"--revision is for a hub repo id; {source} is "
                         f"{'a local path' if Path(source).exists() else 'neither a local path nor a hub repo id'}")
    with folder_lock(out, "run folder"):  # one writer at a time, from here to the publish
        check_out(out, force)  # again, now that no other writer can change it
        say = progress or (lambda _msg: None)
        kind, path = detect_source(source)
        name = out.name if out.name not in ("", ".", "..") else "converted"
        say(f"reading {kind} {path}")
        if kind == "lerobot":
            config, normalizer, weights, src, step = read_lerobot(path, name)
        else:
            config, normalizer, weights, src, step = read_original(path, name, ema=ema)
        if hub is not None:
            src["hub"] = hub
        if check is not None:
            if reference is None:
                reference = read_reference(_auto_reference(source, path, kind))
            say(f"checking against {reference.path}")
            src["check"] = _run_check(config, normalizer, weights, src, reference)
        say(f"writing {out}")
        write_run(out, config, normalizer, weights, src, step=step, force=force)
    p = config.policy
    return {"out": str(out), "source": src, "check": src.get("check"), "obs_mode": p.obs_mode, "observations": list(p.obs_keys) or None,
            "n_obs_steps": p.n_obs_steps, "horizon": p.horizon, "n_action_steps": p.n_action_steps,
            "down_dims": list(p.down_dims), "step": step}


def _run_check(config, normalizer, weights: dict[str, Any], src: dict[str, Any], reference) -> dict[str, Any]:
    """The converted model, built as write_run builds it, against `reference`; raises on a failed check."""
    from dpkit.convert.check import check_policy
    from dpkit.convert.mapping import load_mapped
    from dpkit.train.policy import DiffusionPolicy

    config.validate()
    policy = DiffusionPolicy(config.policy, normalizer)
    load_mapped(policy, weights, src.get("path", "source"))
    result = check_policy(policy.eval(), reference)
    if not result["passed"]:
        raise DpkitError(f"--check failed against {reference.path}: {result['message']}; the run was not written")
    return result
