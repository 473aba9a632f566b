"""The model names of `alpaca-chat serve --lora NAME=FILE[:SCALE]`: the base, and `BASE+NAME` per adapter.

Each name is a `Variant`: the adapter set the engine runs requests for it with, and its own prompt
cache on disk (states computed under one adapter set are never reused under another). Every
adapter is applied once at startup, so that a bad file (another architecture, wrong shapes,
truncated) stops the server before it serves, in one line.
"""

import re
from dataclasses import dataclass

from alpaca_chat.errors import UsageError
from alpaca_chat.lora_spec import AdapterSpec, parse_lora_arg
from alpaca_chat.server.prompt_cache import SavedPrefixes

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Variant:
    model_id: str  # what a request's `model` names: "BASE" or "BASE+NAME"
    adapters: tuple[AdapterSpec, ...]  # () for the base
    saved: SavedPrefixes | None = None  # its prompt cache on disk


def parse_named_lora(text: str) -> tuple[str, AdapterSpec]:
    """`NAME=FILE[:SCALE]` -> (NAME, the adapter)."""
    name, sep, rest = str(text).partition("=")
    if not sep or not rest:
        raise UsageError(f"--lora takes NAME=FILE[:SCALE], not {text!r}")
    if not NAME.match(name):
        raise UsageError(f"--lora name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name, parse_lora_arg(rest)


def parse_loras(values: list[str] | None) -> list[tuple[str, AdapterSpec]]:
    named = [parse_named_lora(v) for v in values or []]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise UsageError(f"--lora names must differ: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return named


def open_variants(engine, base_id: str, named: list[tuple[str, AdapterSpec]], cache_mb: int) -> dict[str, Variant]:
    """The base and one variant per named adapter, each adapter checked and applied once (an error
    is raised as the engine words it: the adapter and the tensor). The disk budget of the prompt
    cache is shared out between them. The engine is left on the base."""
    share = max(1, cache_mb // (len(named) + 1)) if cache_mb > 0 else 0
    variants = {base_id: Variant(base_id, (), SavedPrefixes.open(engine, share))}
    try:
        for name, spec in named:
            engine.set_adapters([spec])
            model_id = f"{base_id}+{name}"
            variants[model_id] = Variant(model_id, (spec,), SavedPrefixes.open(engine, share))
    except BaseException:
        close_variants(variants)
        raise
    finally:
        engine.set_adapters(())
    return variants


def close_variants(variants: dict[str, Variant]) -> None:
    for variant in variants.values():
        if variant.saved is not None:
            variant.saved.close()
