"""Which install extra each `alpaca-convert` command needs, and whether it is installed.

The chat install (`pip install .`) puts `alpaca-convert` on the PATH, but
only `quantize`, `eval` and `inspect` run on it. Every other command needs an
extra from pyproject.toml, the smallest that makes it work:

    export    safetensors, sentencepiece     export, and the default convert command
    generate  rouge-score                    generate (self-instruct runs on the chat engine)
    plot      matplotlib                     eval --ladder's size-vs-KL plot
    convert   torch, transformers, peft, ... finetune, merge, pipeline, compare (and all of the above)

`check(command, args)` runs before a command does any work or creates any
file: a missing package is one line, exit 2, with the exact install command
(torch first for the `convert` extra, so that pip takes the CPU wheel). Whether
a package is there is asked of the import system without importing it, so
`--help` can mark every command without loading torch.

A new command adds its row to `COMMANDS` (and its extra to pyproject.toml and
the README's dependency table); tests/test_convert_extras.py checks that the
table and pyproject.toml agree and runs every command with its packages hidden.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from alpaca_chat.errors import UsageError

DISTRIBUTION = "alpaca-chat"
TORCH_PIN = "torch==2.13.0"  # pyproject.toml's pin, for when the installed metadata cannot be read

# Each extra of pyproject.toml: the import names of its packages.
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("safetensors", "sentencepiece"),
    "generate": ("rouge_score",),
    "plot": ("matplotlib",),
    "convert": (
        "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "sentencepiece", "google.protobuf",
        "matplotlib", "rouge_score",
    ),
}
# Import name -> the name pip knows the package by, where they differ.
PACKAGE_NAMES = {"rouge_score": "rouge-score", "google.protobuf": "protobuf"}


@dataclass(frozen=True)
class Need:
    """Packages a command imports, from `extra`; only when `when(args)` holds, if given."""

    extra: str
    modules: tuple[str, ...]
    when: Callable[[argparse.Namespace], bool] | None = None
    flag: str = ""  # the flag that brings the need, for messages: "--ladder"


_EXPORT = Need("export", EXTRAS["export"])
_PICKLE = Need("convert", ("torch",), when=lambda args: getattr(args, "allow_pickle", False), flag="--allow-pickle")
_TRAINING = ("torch", "transformers", "peft", "accelerate", "datasets")

COMMANDS: dict[str, tuple[Need, ...]] = {
    "convert": (_EXPORT, _PICKLE),
    "export": (_EXPORT, _PICKLE),
    "export-adapter": (Need("export", ("safetensors",)),),
    "quantize": (),
    "imatrix": (),  # a checkpoint (not a GGUF) as input needs the export extra: quant_commands checks it
    "eval": (Need("plot", EXTRAS["plot"], when=lambda args: bool(getattr(args, "ladder", None)), flag="--ladder"),),
    "inspect": (),
    "generate": (Need("generate", EXTRAS["generate"]),),
    "finetune": (Need("convert", (*_TRAINING, "matplotlib")),),
    "merge": (Need("convert", (*_TRAINING, "safetensors")),),
    "pipeline": (Need("convert", EXTRAS["convert"]),),
    "compare": (Need("convert", (*_TRAINING, "rouge_score", "matplotlib")),),
    "prune": (Need("convert", ("torch", "transformers", "safetensors")),),
    "distill": (Need("convert", (*_TRAINING, "safetensors")),),
}


class MissingDependencyError(UsageError):
    """A command's packages are not installed; the message says which extra to install, and how."""


def check(command: str, args: argparse.Namespace | None = None) -> None:
    """Raise MissingDependencyError if `command` (with `args`: its flags too) lacks a package.

    Without `args`, only what the command always needs is checked (before its flags are parsed)."""
    for need in COMMANDS.get(command, ()):
        if need.when is not None and (args is None or not need.when(args)):
            continue
        missing = [m for m in need.modules if not installed(m)]
        if missing:
            what = f"{command} {need.flag}" if need.flag else command
            names = ", ".join(PACKAGE_NAMES.get(m, m) for m in missing)
            verb = "is" if len(missing) == 1 else "are"
            raise MissingDependencyError(
                f"{what} needs the '{need.extra}' extra ({names} {verb} not installed): {install_command(need.extra)}"
            )


def status(command: str) -> str:
    """'ready', or which extra the command (or one of its flags) still needs: for --help."""
    lacking = [
        f"{need.flag + ' ' if need.flag else ''}needs the '{need.extra}' extra"
        for need in COMMANDS.get(command, ())
        if not all(installed(m) for m in need.modules)
    ]
    return "; ".join(lacking) or "ready"


def missing_extras(commands) -> list[str]:
    """The extras that some of `commands` still need, in EXTRAS' order."""
    wanted = {
        need.extra for c in commands for need in COMMANDS.get(c, ()) if not all(installed(m) for m in need.modules)
    }
    return [extra for extra in EXTRAS if extra in wanted]


@functools.cache
def installed(module: str) -> bool:
    """Whether `module` can be imported, asked of the import system without importing it (once)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_command(extra: str) -> str:
    """The exact command that installs `extra` into this environment (torch first for `convert`)."""
    editable = "-e " if _editable() else ""
    command = f"pip install {editable}{shlex.quote(f'{_install_target()}[{extra}]')}"
    if "torch" in EXTRAS[extra]:
        command = f"pip install {_torch_pin()} && {command}"
    return command


def _install_target() -> str:
    """Where this copy was installed from: its checkout (`.` when that is the current directory), else the
    package name."""
    source = _source_dir()
    if source is None:
        return DISTRIBUTION
    try:
        if source.resolve() == Path.cwd().resolve():
            return "."
    except OSError:
        pass
    return str(source)


def _source_dir() -> Path | None:
    url = (_direct_url() or {}).get("url", "")
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "alpaca_chat").is_dir():
        return checkout  # run from a checkout (an editable install, or the source tree itself)
    return None


def _editable() -> bool:
    info = _direct_url()
    if info is not None:
        return bool(info.get("dir_info", {}).get("editable"))
    return _source_dir() is not None  # a checkout the package is imported from in place


def _direct_url() -> dict | None:
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        return json.loads(text) if text else None
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None


def _torch_pin() -> str:
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if spec.strip().startswith("torch") and "convert" in marker:
            return spec.strip().replace(" ", "")
    return TORCH_PIN

