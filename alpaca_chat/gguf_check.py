"""Validate a GGUF file in Python before llama.cpp ever sees it.

llama.cpp trusts the file it is given: a truncated download, an HTML error
page saved as `.gguf` or a corrupted header can make it dump pages of logs or
abort the process. `check_gguf` raises one of the typed errors from
`errors.py` instead, with a one-line message that names the file:

- `gguf_parse` reads the header with a bounded parser (magic, version, value
  types, tensor infos, the layout of the tensor data);
- here, `general.architecture` must be one llama.cpp knows;
- `gguf_hparams` checks the hyperparameters llama.cpp would trust.

`check_memory` (from `gguf_memory`) compares `GGUFInfo.estimated_ram_bytes`
with the memory the machine has available.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_chat import gguf_memory
from alpaca_chat.errors import InvalidModelFileError
from alpaca_chat.gguf_hparams import check_hyperparameters
from alpaca_chat.gguf_memory import available_memory_bytes, check_memory
from alpaca_chat.gguf_parse import SUPPORTED_VERSIONS, Parsed, TensorInfo, as_int, gguf, parse_file, printable

__all__ = [
    "KNOWN_ARCHITECTURES",
    "SUPPORTED_VERSIONS",
    "GGUFInfo",
    "TensorInfo",
    "available_memory_bytes",
    "check_gguf",
    "check_memory",
]

KNOWN_ARCHITECTURES: tuple[str, ...] = tuple(gguf.MODEL_ARCH_NAMES.values())
_NOT_LANGUAGE_MODELS = {"clip": "a vision projector (mmproj) file, not a language model"}


@dataclass(frozen=True)
class GGUFInfo:
    """What `check_gguf` learned about a valid GGUF file."""

    path: Path
    version: int
    architecture: str
    name: str | None
    file_size: int
    tensor_count: int
    n_params: int
    tensor_data_bytes: int
    file_type: str | None  # quantization label, e.g. "Q4_1"
    context_length: int | None
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int | None
    # Scalar and string values, plus numeric arrays of up to 512 elements as tuples.
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def arch_value(self, suffix: str) -> Any:
        """The value of `{architecture}.{suffix}` (e.g. "block_count"), or None."""
        return self.metadata.get(f"{self.architecture}.{suffix}")

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """Size of an f16 KV cache for `n_ctx` tokens (0 if the header lacks the shape)."""
        return gguf_memory.kv_cache_bytes(self, n_ctx)

    def estimated_ram_bytes(self, n_ctx: int) -> int:
        """Rough RAM needed to chat with `n_ctx` tokens of context (see `gguf_memory`)."""
        return gguf_memory.estimated_ram_bytes(self, n_ctx)


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Validate the GGUF at `path` without loading it; raise a typed error if llama.cpp would fail.

    Raises ModelNotFoundError if the file does not exist, InvalidModelFileError
    for everything else (directory, not GGUF, unsupported version, truncated,
    corrupted header, unsupported architecture, impossible hyperparameters).
    """
    return _build_info(Path(path), os.fspath(path), parse_file(path))


def _build_info(path: Path, display: str, parsed: Parsed) -> GGUFInfo:
    md = parsed.metadata
    arch = md.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise InvalidModelFileError(f"{display} has no general.architecture key, so llama.cpp cannot load it")
    if not isinstance(arch, str):
        raise InvalidModelFileError(f"{display} has a corrupted header: general.architecture is not a string")
    if arch in _NOT_LANGUAGE_MODELS:
        raise InvalidModelFileError(f"{display} is {_NOT_LANGUAGE_MODELS[arch]} (architecture '{arch}')")
    if arch not in KNOWN_ARCHITECTURES:
        known = [a for a in KNOWN_ARCHITECTURES if a not in _NOT_LANGUAGE_MODELS]
        raise InvalidModelFileError(
            f"{display}: architecture '{printable(arch)}' is not supported by llama.cpp"
            f" (known: {', '.join(known[:8])} and {len(known) - 8} more)"
        )
    tokens = parsed.array_lengths.get(gguf.Keys.Tokenizer.LIST)
    check_hyperparameters(display, arch, md, parsed.types, parsed.array_lengths, parsed.tensors)
    return GGUFInfo(
        path=path,
        version=parsed.version,
        architecture=arch,
        name=_str_or_none(md.get(gguf.Keys.General.NAME)),
        file_size=parsed.file_size,
        tensor_count=len(parsed.tensors),
        n_params=sum(t.n_elements for t in parsed.tensors),
        tensor_data_bytes=sum(t.n_bytes for t in parsed.tensors),
        file_type=_file_type_label(md.get(gguf.Keys.General.FILE_TYPE), parsed.tensors),
        context_length=as_int(md.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch))),
        chat_template=_str_or_none(md.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)),
        bos_token_id=as_int(md.get(gguf.Keys.Tokenizer.BOS_ID)),
        eos_token_id=as_int(md.get(gguf.Keys.Tokenizer.EOS_ID)),
        vocab_size=tokens or as_int(md.get(gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch))),
        metadata=md,
    )


def _file_type_label(value: Any, tensors: list[TensorInfo]) -> str | None:
    """general.file_type as a label like "Q4_1"; without it, the type holding the most bytes."""
    if as_int(value) is not None:
        try:
            name = gguf.LlamaFileType(value).name
        except ValueError:
            return None
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    by_type: dict[int, int] = {}
    for t in tensors:
        by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
    if not by_type:
        return None
    return gguf.GGMLQuantizationType(max(by_type, key=by_type.__getitem__)).name


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
