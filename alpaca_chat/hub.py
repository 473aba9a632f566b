"""The Hugging Face hub and its local cache: the only module that touches the network.

huggingface_hub is imported lazily, inside the functions that need it:
resolving the bundled default model or a local path never imports it (startup
time matters). Hub files go to the standard Hugging Face cache. Offline
(HF_HUB_OFFLINE=1, ``offline=True``, or the hub unreachable) a matching GGUF
already in that cache is used without any network access.
"""

import sys
from pathlib import Path

from alpaca_chat.errors import ModelNotFoundError, UsageError
from alpaca_chat.model_files import available_quants, gguf_units, pick_gguf


# --- The hub ------------------------------------------------------------------


class _HubUnreachable(Exception):
    """The hub could not be asked (offline, no connection, server error): fall back to the cache."""


def fetch(repo: str, selector: str | None, *, label: str, offline: bool | None) -> Path:
    """Download (or find in the HF cache) the GGUF `selector` picks from `repo`."""
    reason = "offline" if _offline(offline) else None
    if reason is None:
        try:
            return _download(repo, selector, label=label)
        except _HubUnreachable as unreachable:
            reason = str(unreachable)
    cached = find_cached(repo, selector)
    if cached:
        return cached[0]
    cached_quants = available_quants(gguf_units(_cached_snapshot_files(repo)))
    hint = f" (cached for this repo: {cached_quants})" if cached_quants else ""
    raise ModelNotFoundError(
        f"{label} is not in the local Hugging Face cache and the hub cannot be reached ({reason}); "
        f"download it once online{hint}"
    )


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _download(repo: str, selector: str | None, *, label: str) -> Path:
    """Fetch the picked GGUF (every shard of a split one) into the HF cache; the file to load."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    filename = selector
    try:
        # model_info is one request without retries (list_repo_files, and hf_hub_download
        # of an uncached file, back off for half a minute): offline, we fall back at once.
        info = HfApi().model_info(repo, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        files = pick_gguf((sibling.rfilename for sibling in info.siblings or ()), selector, label=repo)
        paths = []
        for filename in files:
            # huggingface_hub draws its own tqdm progress bar, on stderr.
            paths.append(Path(hf_hub_download(repo, filename)))
    except HFValidationError as exc:
        raise UsageError(f"invalid hub repo id {repo!r} in {label!r}") from exc
    except LocalEntryNotFoundError as exc:  # the hub did not answer and the file is not cached
        raise _HubUnreachable("connection failed") from exc
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"{repo} is gated: accept its terms on the hub, then log in (hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"no such model repo on the Hugging Face hub: {repo} (or it is private)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{repo} has no main branch on the Hugging Face hub") from exc
    except EntryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo} has no file {filename}") from exc
    except OfflineModeIsEnabled as exc:
        raise _HubUnreachable("offline") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "error"
        raise _HubUnreachable(f"HTTP {status} from the hub") from exc
    except _transport_errors() as exc:
        raise _HubUnreachable("connection failed") from exc
    return paths[0]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP client this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    clients = (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException"))
    for module_name, class_name in clients:
        error = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


# --- The local Hugging Face cache (no network) --------------------------------


def default_cache_dir() -> Path:
    """The standard Hugging Face hub cache (HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_cache_dir(repo: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / ("models--" + repo.replace("/", "--"))


def _snapshots(repo_dir: Path) -> list[Path]:
    """A cached repo's snapshots: the one `refs/main` points to first, then newest first."""
    snapshots_dir = repo_dir / "snapshots"
    if not snapshots_dir.is_dir():
        return []
    snapshots = [p for p in snapshots_dir.iterdir() if p.is_dir()]
    snapshots.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    try:
        main = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = None
    return sorted(snapshots, key=lambda p: p.name != main)


def _snapshot_files(snapshot: Path) -> list[str]:
    """GGUF files present in a snapshot (broken links to missing blobs left out)."""
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if p.is_file())


def _cached_snapshot_files(repo: str) -> list[str]:
    return sorted({f for snapshot in _snapshots(_repo_cache_dir(repo)) for f in _snapshot_files(snapshot)})


def find_cached(repo: str, selector: str | None, cache_dir: Path | None = None) -> tuple[Path, ...]:
    """The cached files of the GGUF `selector` picks from `repo` (first: the one to load); () if none."""
    for snapshot in _snapshots(_repo_cache_dir(repo, cache_dir)):
        try:
            files = pick_gguf(_snapshot_files(snapshot), selector, label=repo)
        except ModelNotFoundError:
            continue
        return tuple(snapshot / f for f in files)
    return ()


def cached_ggufs(cache_dir: Path) -> dict[str, list[tuple[Path, ...]]]:
    """Every cached model repo's GGUFs in its current snapshot: repo -> [files of each model]."""
    found: dict[str, list[tuple[Path, ...]]] = {}
    if not cache_dir.is_dir():
        return found
    for repo_dir in sorted(cache_dir.glob("models--*--*")):
        repo = repo_dir.name[len("models--") :].replace("--", "/", 1)
        snapshots = _snapshots(repo_dir)
        if snapshots:
            units = gguf_units(_snapshot_files(snapshots[0]))
            found[repo] = [tuple(snapshots[0] / f for f in unit) for unit in units]
    return found
