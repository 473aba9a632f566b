"""Which GGUF of a repo's files to load: quantization names, split shards, preferences.

Pure: file names in, file names out. Used by `models` (local files, the
registry, the listing) and by `hub` (a repo's files on the hub or in the cache).
"""

import re
from collections.abc import Iterable

from alpaca_chat.errors import ModelNotFoundError

# Without an explicit quant, the first of these present in a repo is chosen.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")

# Quantization names as llama.cpp and the usual GGUF uploaders spell them in file
# names: Q4_K_M, Q8_0, Q4_0_4_4, IQ4_XS, IQ2_XXS, TQ1_0, F16, BF16, MXFP4...
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|BF16|FP?16|FP?32|MXFP4)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


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
    units = gguf_units(filenames)
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
                f"{label} has no GGUF with quant {selector.upper()} (available: {available_quants(units)})"
            )
        return _only(matches, label)
    if len(units) == 1:
        return units[0]
    for quant in PREFERRED_QUANTS:
        matches = [unit for unit in units if parse_quant(unit[0]) == quant]
        if matches:
            return _only(matches, label)
    raise ModelNotFoundError(
        f"{label} has several GGUF files; pick one with {label}:QUANT (available: {available_quants(units)})"
    )


def gguf_units(filenames: Iterable[str]) -> list[tuple[str, ...]]:
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


def available_quants(units: list[tuple[str, ...]]) -> str:
    names = {parse_quant(unit[0]) or unit[0] for unit in units}
    return ", ".join(sorted(names))


def _only(matches: list[tuple[str, ...]], label: str) -> tuple[str, ...]:
    if len(matches) > 1:
        files = ", ".join(unit[0] for unit in matches)
        raise ModelNotFoundError(f"{label} has several matching GGUF files ({files}); name one as {label}:FILE.gguf")
    return matches[0]

