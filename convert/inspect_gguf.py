"""`alpaca-convert inspect`: a GGUF's metadata and a summary of its tensors, readable.

The file is validated by `alpaca_chat.gguf_check` first (a corrupt file gets
a one-line error), then read with gguf's `GGUFReader`. Long values (the
vocabulary, merges, chat templates) are abbreviated.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from alpaca_chat import gguf_check

_MAX_VALUE = 100  # characters of a string value shown
_MAX_ITEMS = 5  # array items shown


def describe(path: str | os.PathLike[str], *, tensors: bool = False) -> str:
    """The report, as text: overview, metadata, tensor types (and every tensor if asked)."""
    from gguf import GGUFReader, GGUFValueType

    path = Path(path)
    info = gguf_check.check_gguf(path)
    reader = GGUFReader(path)
    lines = [
        f"{path}  ({_size(info.file_size)})",
        f"  architecture {info.architecture}, {_count(info.n_params)} parameters, {info.tensor_count} tensors, "
        f"GGUF v{info.version}",
        "",
        "metadata:",
    ]
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        lines.append(f"  {field.name} = {_value(field, GGUFValueType)}")

    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for tensor in reader.tensors:
        by_type[tensor.tensor_type.name] += 1
        bytes_by_type[tensor.tensor_type.name] += int(tensor.n_bytes)
    lines += ["", "tensors by type:"]
    for name, count in sorted(by_type.items(), key=lambda kv: -bytes_by_type[kv[0]]):
        lines.append(f"  {name:<8} {count:>5} tensors  {_size(bytes_by_type[name]):>11}")
    if tensors:
        lines += ["", "tensors:"]
        for tensor in reader.tensors:
            shape = "x".join(str(int(d)) for d in tensor.shape)
            size = _size(int(tensor.n_bytes))
            lines.append(f"  {tensor.name:<40} {tensor.tensor_type.name:<8} {shape:>16}  {size:>11}")
    return "\n".join(lines)


def _value(field, vt) -> str:
    kind = field.types[0] if field.types else None
    if kind == vt.ARRAY:
        n = len(field.data)
        shown = [_scalar(field.contents(i), field.types[1:]) for i in range(min(n, _MAX_ITEMS))]
        more = f", … ({n} items)" if n > _MAX_ITEMS else ""
        return f"[{', '.join(shown)}{more}]"
    return _scalar(field.contents(), field.types)


def _scalar(value, types) -> str:
    if isinstance(value, str):
        text = value if len(value) <= _MAX_VALUE else value[:_MAX_VALUE] + f"… ({len(value)} chars)"
        return repr(text)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
