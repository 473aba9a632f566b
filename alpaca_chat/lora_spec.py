"""What a LoRA adapter on the command line, in the config or in `/lora` is: `FILE[:SCALE]` (pure, no I/O).

The engine applies `AdapterSpec`s (engine/adapters.py); the CLI, the config and the `/lora`
command parse them here, so that a bad scale is a usage error before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from alpaca_chat.errors import UsageError


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter file and the scale it is applied with (1.0: as trained; 0: loaded but off)."""

    path: Path
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def name(self) -> str:
        """The name `/lora` refers to it by: the file name without `.gguf`."""
        name = self.path.name
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name

    def with_scale(self, scale: float) -> "AdapterSpec":
        return AdapterSpec(self.path, check_scale(scale, str(self.path)))

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"

    def label(self) -> str:
        """Short form for a status bar: `name` at scale 1, else `name×0.5`."""
        return self.name if self.scale == 1.0 else f"{self.name}×{self.scale:g}"


def check_scale(scale: float, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UsageError(f"LoRA scale for {what} must be a finite number, not {scale!r}")
    return float(scale)


def parse_lora_arg(text: str) -> AdapterSpec:
    """`FILE` or `FILE:SCALE`: split on the last ':' only when what follows it is a number, so that
    a path with a colon in it still works (`a:b.gguf` is a file; `a:b.gguf:0.5` is that file at 0.5)."""
    text = str(text).strip()
    if not text:
        raise UsageError("--lora needs a file: --lora FILE[:SCALE]")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            scale = None
        if scale is not None:
            return AdapterSpec(Path(head).expanduser(), check_scale(scale, head))
    return AdapterSpec(Path(text).expanduser(), 1.0)


def format_adapters(specs) -> str:
    """`name, name×0.5` for the status bar and /stats; "" for none."""
    return ", ".join(spec.label() for spec in specs)


# -- /lora: what a command does to the set (the front ends apply it through the session) -------------

LORA_USAGE = ("usage: /lora [list] | /lora add FILE[:SCALE] | /lora off NAME|all | /lora on NAME|all | "
              "/lora scale NAME SCALE")


@dataclass(frozen=True)
class LoraPlan:
    """The adapter set a /lora command asks for: `active` to apply, `off` remembered for `/lora on`."""

    active: tuple[AdapterSpec, ...]
    off: tuple[AdapterSpec, ...]
    message: str


def plan_lora(args: str, active, off) -> LoraPlan | None:
    """What `/lora ARGS` does to (active, off); None for a listing. UsageError for a bad command."""
    words = args.split(maxsplit=1)
    verb, rest = (words[0].lower(), words[1].strip() if len(words) > 1 else "") if words else ("list", "")
    active, off = tuple(active), tuple(off)
    if verb in ("list", "ls") and not rest:
        return None
    if verb == "add" and rest:
        spec = parse_lora_arg(rest)
        kept = tuple(s for s in active if s.path != spec.path)
        return LoraPlan(kept + (spec,), tuple(s for s in off if s.path != spec.path), f"LoRA {spec.label()} on")
    if verb == "off" and rest:
        chosen = _find(rest, active, "on")
        return LoraPlan(tuple(s for s in active if s not in chosen), off + chosen,
                        f"LoRA {format_adapters(chosen)} off")
    if verb == "on" and rest:
        chosen = _find(rest, off, "off")
        return LoraPlan(active + chosen, tuple(s for s in off if s not in chosen), f"LoRA {format_adapters(chosen)} on")
    if verb == "scale":
        name, _, value = rest.rpartition(" ")
        if not name.strip():
            raise UsageError("usage: /lora scale NAME SCALE")
        try:
            scale = float(value)
        except ValueError:
            raise UsageError(f"/lora scale: {value!r} is not a number") from None
        (old,) = _find(name.strip(), active + off, "known", single=True)
        new = old.with_scale(scale)
        if old in active:  # rescaled in place, its position kept
            return LoraPlan(tuple(new if s == old else s for s in active), off, f"LoRA {new.label()}")
        return LoraPlan(active + (new,), tuple(s for s in off if s != old), f"LoRA {new.label()} on")
    raise UsageError(LORA_USAGE)


def _find(name: str, specs: tuple[AdapterSpec, ...], state: str, *, single: bool = False) -> tuple[AdapterSpec, ...]:
    if name.lower() == "all" and not single:
        if not specs:
            raise UsageError(f"no LoRA adapter is {state}")
        return specs
    found = tuple(s for s in specs if name in (s.name, str(s.path)))
    if not found:
        known = ", ".join(s.name for s in specs) or "none"
        raise UsageError(f"no LoRA adapter {name!r} is {state} (those that are: {known})")
    if len(found) > 1:
        raise UsageError(f"{name!r} names {len(found)} adapters; use the file's path")
    return found


def format_lora_list(active, off) -> str:
    """The `/lora` listing: one line per adapter, on or off."""
    if not active and not off:
        return "No LoRA adapters (add one: /lora add FILE[:SCALE])."
    lines = [f"  on   {s.name:<24} scale {s.scale:<6g} {s.path}" for s in active]
    lines += [f"  off  {s.name:<24} scale {s.scale:<6g} {s.path}" for s in off]
    return "LoRA adapters:\n" + "\n".join(lines)
