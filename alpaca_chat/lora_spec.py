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
