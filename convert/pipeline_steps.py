"""The pipeline's steps and manifests: each step's inputs, settings and outputs recorded with their sha256.

    run_step(Step(...), out, Hasher(cache_file), report) -> StepOutcome

A step whose inputs, settings and outputs match its manifest (DIR/manifests/STEP.json)
is skipped; one that was interrupted is resumed; anything else is run again. Hashes
are cached by (path, size, mtime), so a re-run does not read gigabytes again.
convert/pipeline.py builds the steps; this module only runs and records them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_chat import __version__
from convert.atomic import atomic_output

MANIFESTS = "manifests"
HASH_CACHE = ".hash-cache.json"


@dataclass(frozen=True)
class Step:
    """One unit of work: what it reads, how it is set, what it writes, and how to do it."""

    name: str
    inputs: dict[str, Path | str]  # a path is hashed; a string (a hub id) is taken as is
    settings: dict
    outputs: tuple[Path, ...]
    run: Callable[[bool], dict]  # resume? -> facts for the summary


@dataclass
class StepOutcome:
    name: str
    skipped: bool
    seconds: float
    info: dict = field(default_factory=dict)


def run_step(step: Step, out: Path, hasher: Hasher, report: Callable[[str], None]) -> StepOutcome:
    manifest_file = out / MANIFESTS / f"{_slug(step.name)}.json"
    inputs = {name: _describe(value, hasher) for name, value in step.inputs.items()}
    previous = read_json(manifest_file)
    same = previous is not None and previous.get("inputs") == inputs and previous.get("settings") == step.settings
    if same and previous.get("status") == "done" and _outputs_intact(previous, out, hasher):
        report(f"{step.name}: up to date, skipped")
        return StepOutcome(step.name, True, 0.0, previous.get("info") or {})
    resume = same and previous.get("status") == "running"
    report(f"{step.name}: {'resuming' if resume else 'running'}")
    manifest = {
        "step": step.name, "version": __version__, "status": "running", "inputs": inputs, "settings": step.settings
    }
    write_json(manifest_file, manifest)
    started = time.perf_counter()
    info = step.run(resume)
    seconds = time.perf_counter() - started
    outputs = {str(p.relative_to(out)): _describe(p, hasher) for p in step.outputs}
    write_json(manifest_file, {**manifest, "status": "done", "outputs": outputs, "seconds": seconds, "info": info})
    report(f"{step.name}: done in {seconds:.1f} s")
    return StepOutcome(step.name, False, seconds, info)


def _outputs_intact(manifest: dict, out: Path, hasher: Hasher) -> bool:
    recorded = manifest.get("outputs") or {}
    return bool(recorded) and all(
        (out / name).exists() and _describe(out / name, hasher) == value for name, value in recorded.items()
    )


class Hasher:
    """sha256 of files and directories, cached by (size, mtime) across runs."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self.cache = read_json(cache_file) or {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        if path.is_dir():
            h = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{file.relative_to(path).as_posix()}\0{self._file(file)}\n".encode())
            return h.hexdigest()
        return self._file(path)

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = self.cache.get(key)
        if cached and cached[:2] == stamp:
            return cached[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.cache[key] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            write_json(self.cache_file, self.cache)
            self.dirty = False


def input_source(spec: str) -> Path | str:
    """A data source: a local path is hashed, anything else (a hub id) is recorded by name."""
    path = Path(spec).expanduser()
    return path if path.exists() else spec


def _describe(value: Path | str, hasher: Hasher) -> dict:
    if isinstance(value, str):
        return {"id": value}
    if not value.exists():
        return {"path": str(value), "missing": True}
    return {"path": str(value), "sha256": hasher.digest(value)}


def _slug(name: str) -> str:
    return name.replace(" ", "-").lower()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
