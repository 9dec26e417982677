"""A Hugging Face hub repo id as the source of `dpkit-convert` (lerobot policies are named by one).

    dpkit-convert lerobot/diffusion_pusht --out runs/lerobot_pusht [--revision v1.0 | <commit>]

    from dpkit.convert.hub import fetch_repo
    folder, record = fetch_repo("lerobot/diffusion_pusht", revision=None)   # the snapshot folder in the cache

Only what the lerobot reader opens and records is fetched: the repo's top-level `*.json` and `*.safetensors`
(config.json, model.safetensors, the policy_*processor files and their statistics). Downloads go through
huggingface_hub's snapshot_download into its standard cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub) with its progress bars (off with --no-progress), and honour its settings: HF_ENDPOINT,
HF_TOKEN, HF_HUB_OFFLINE=1 (the cache only; nothing is sent). A cached revision converts offline; a revision the
cache does not hold, an unknown repo, a network failure are each one line naming the id and the cache folder.

A local path that exists always wins over a hub id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dpkit.errors import DpkitError

ALLOW = ["*.json", "*.safetensors"]
IGNORE = ["*/*"]  # top level only: what convert/lerobot.py reads from a save_pretrained folder
# "owner/name" as the hub spells repo ids (no "--" or ".." and no leading/trailing "-" / ".", max 96 chars)
REPO_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


def is_repo_id(source: str | Path) -> bool:
    """True if `source` is not an existing local path and is spelled like a hub repo id ("owner/name")."""
    text = str(source)
    if Path(text).exists():
        return False
    return (len(text) <= 96 and REPO_ID.match(text) is not None and "--" not in text and ".." not in text
            and not text.endswith((".ckpt", ".json", ".safetensors")))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE).expanduser())


def fetch_repo(repo_id: str, revision: str | None = None, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """(the cached snapshot folder of `repo_id` at `revision`, {"repo_id", "revision", "commit", "cache"})."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:
        raise DpkitError(f"{repo_id} is not a local path; fetching it from the Hugging Face hub needs "
                         f"huggingface_hub (pip install huggingface_hub)") from None
    rev = revision or "main"
    cache = _cache_dir()
    name = f"{repo_id}@{rev}"
    was_disabled = are_progress_bars_disabled()
    if not progress and not was_disabled:
        disable_progress_bars()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    except hf.IncompleteSnapshotError:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached")
        raise DpkitError(f"{name}: {why} and the hub cache {cache} holds only part of its files "
                         f"(fetch it once online to complete it)") from None
    except hf.LocalEntryNotFoundError as e:
        if constants.is_offline_mode() or isinstance(e.__cause__, hf.OfflineModeIsEnabled):
            raise DpkitError(f"{name} is no local path and not in the hub cache {cache}, and HF_HUB_OFFLINE is set "
                             f"(fetch it once online, or give a local folder)") from None
        raise DpkitError(f"{name} is no local path, the hub at {constants.ENDPOINT} cannot be reached "
                         f"({_cause(e.__cause__ or e)}) and the hub cache {cache} does not hold it") from None
    except hf.RevisionNotFoundError:
        raise DpkitError(f"{repo_id}: the hub has no revision {rev!r} (a branch, tag or commit of the repo)") from None
    except hf.GatedRepoError:
        raise DpkitError(f"{repo_id} is gated on the hub: accept its terms and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise DpkitError(f"{repo_id} is neither a local path nor a model repo on the hub at {constants.ENDPOINT} "
                         f"(a private repo needs HF_TOKEN)") from None
    except hf.HFValidationError as e:
        raise DpkitError(f"{repo_id}: not a valid hub repo id or revision ({e})") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise DpkitError(f"{name}: the hub at {constants.ENDPOINT} answered HTTP {status} ({_cause(e)})") from None
    except OSError as e:  # disk full, unwritable cache, a proxy or TLS failure
        raise DpkitError(f"{name}: fetching into the hub cache {cache} failed ({_cause(e)})") from None
    except Exception as e:  # noqa: BLE001 - the transport's own errors (httpx2) are not OSError
        raise DpkitError(f"{name}: fetching from the hub at {constants.ENDPOINT} failed "
                         f"({type(e).__name__}: {_cause(e)})") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    folder = Path(folder)
    record = {"repo_id": repo_id, "revision": rev, "commit": folder.name, "cache": cache,
              "huggingface_hub": huggingface_hub.__version__}
    return folder, record


def _cause(e: BaseException) -> str:
    """The first line of an error's message (huggingface_hub's run over several lines)."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
