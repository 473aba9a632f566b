"""How much RAM a GGUF needs to chat, and whether the machine has it.

The estimate: the weights (the tensor data, memory-mapped), an f16 KV cache
for the context, and llama.cpp's compute buffers. Every size comes from
hyperparameters `gguf_check` has bounded and matched against the tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from alpaca_chat.errors import InsufficientMemoryError
from alpaca_chat.gguf_parse import as_int

# llama.cpp's KV cache is f16 by default; the compute buffers hold a micro-batch
# of activations plus one layer's attention scores.
_KV_BYTES_PER_ELEMENT = 2
_N_UBATCH = 512
_COMPUTE_OVERHEAD_BYTES = 64 * 1024 * 1024


class ModelShape(Protocol):
    """What the estimate reads of a checked GGUF (`gguf_check.GGUFInfo` has it)."""

    path: Path
    tensor_data_bytes: int
    vocab_size: int | None

    def arch_value(self, suffix: str) -> Any: ...


def kv_cache_bytes(info: ModelShape, n_ctx: int) -> int:
    """Size of an f16 KV cache for `n_ctx` tokens (0 if the header lacks the shape)."""
    n_layer = as_int(info.arch_value("block_count"))
    n_embd = as_int(info.arch_value("embedding_length"))
    n_head = _per_layer(info.arch_value("attention.head_count"), n_layer)
    if not (n_layer and n_embd and n_head and max(n_head) > 0):
        return 0
    n_head_kv = _per_layer(info.arch_value("attention.head_count_kv"), n_layer) or n_head
    k_dim = as_int(info.arch_value("attention.key_length")) or n_embd // max(n_head)
    v_dim = as_int(info.arch_value("attention.value_length")) or k_dim
    return n_ctx * sum(n_head_kv) * (k_dim + v_dim) * _KV_BYTES_PER_ELEMENT


def estimated_ram_bytes(info: ModelShape, n_ctx: int) -> int:
    """Rough RAM needed to chat with `n_ctx` tokens of context.

    Weights (the tensor data, memory-mapped) + f16 KV cache + compute buffers
    (a fixed 64 MiB, one micro-batch of attention scores, and one micro-batch
    of activations: hidden states, feed-forward, logits).
    """
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    n_head = _per_layer(info.arch_value("attention.head_count"), 1)
    scores = n_ctx * _N_UBATCH * max(n_head or [0]) * 4
    n_embd = as_int(info.arch_value("embedding_length")) or 0
    n_ff = max(_per_layer(info.arch_value("feed_forward_length"), 1) or [0])
    activations = _N_UBATCH * (4 * n_embd + 2 * n_ff + (info.vocab_size or 0)) * 4
    return info.tensor_data_bytes + kv_cache_bytes(info, n_ctx) + _COMPUTE_OVERHEAD_BYTES + scores + activations


def available_memory_bytes() -> int | None:
    """Memory available to a new process, or None if it cannot be told.

    Linux: MemAvailable from /proc/meminfo, which already counts reclaimable
    page cache (where llama.cpp's memory-mapped weights live). Elsewhere:
    free physical pages from sysconf. Container (cgroup) limits are not read.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(info: ModelShape, n_ctx: int, available: int | None = None) -> int:
    """Raise InsufficientMemoryError if the model will not fit; return the estimate in bytes.

    `available` defaults to `available_memory_bytes()`; when that is unknown
    the check is skipped.
    """
    needed = estimated_ram_bytes(info, n_ctx)
    if available is None:
        available = available_memory_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"{info.path} needs about {_gib(needed)} GiB of RAM with a {n_ctx}-token context"
            f" but only {_gib(available)} GiB is available"
        )
    return needed


def _per_layer(value: Any, n_layer: int | None) -> list[int] | None:
    """A per-layer hyperparameter, given either as one int or as an array with one per layer."""
    if type(value) is int:
        return [value] * (n_layer or 1)
    if isinstance(value, tuple) and value and all(type(v) is int for v in value):
        return list(value)
    return None


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"
