"""How much RAM a GGUF needs to chat, and whether the machine has it.

The estimate: the weights (the tensor data, memory-mapped), an f16 KV cache
for the context (attention layers only), the recurrent state of SSM, linear-attention
and short-convolution layers (one per sequence, whatever the context), and llama.cpp's
compute buffers. Every size comes from
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
# llama.cpp keeps recurrent states (its R and S tensors) in f32.
_RECURRENT_BYTES_PER_ELEMENT = 4
# Qwen3-Next / Qwen3.5's default when the file names neither its recurrent layers nor the interval.
_DEFAULT_FULL_ATTENTION_INTERVAL = 4


class ModelShape(Protocol):
    """What the estimate reads of a checked GGUF (`gguf_check.GGUFInfo` has it)."""

    path: Path
    tensor_data_bytes: int
    vocab_size: int | None

    def arch_value(self, suffix: str) -> Any: ...


def kv_cache_bytes(info: ModelShape, n_ctx: int) -> int:
    """Size of an f16 KV cache for `n_ctx` tokens (0 if the header lacks the shape).

    Only attention layers hold one: a recurrent layer has no KV heads (head_count_kv 0 in the
    per-layer array) or is marked recurrent (recurrent_layers / full_attention_interval)."""
    n_layer = as_int(info.arch_value("block_count"))
    n_embd = as_int(info.arch_value("embedding_length"))
    n_head = _per_layer(info.arch_value("attention.head_count"), n_layer)
    if not (n_layer and n_embd and n_head and max(n_head) > 0):
        return 0
    n_head_kv = _per_layer(info.arch_value("attention.head_count_kv"), n_layer) or n_head
    recurrent = recurrent_layers(info)
    n_head_kv = [0 if i < len(recurrent) and recurrent[i] else n for i, n in enumerate(n_head_kv)]
    k_dim = as_int(info.arch_value("attention.key_length")) or n_embd // max(n_head)
    v_dim = as_int(info.arch_value("attention.value_length")) or k_dim
    return n_ctx * sum(n_head_kv) * (k_dim + v_dim) * _KV_BYTES_PER_ELEMENT


def is_recurrent_model(info: ModelShape) -> bool:
    """Whether some layers carry a recurrent state (Mamba, gated DeltaNet, LFM2's short convolutions)."""
    return bool(as_int(info.arch_value("ssm.conv_kernel")) or as_int(info.arch_value("shortconv.l_cache")))


def recurrent_layers(info: ModelShape) -> list[bool]:
    """Per layer, whether it is recurrent, by llama.cpp's rules: an explicit `recurrent_layers` array;
    else, with a per-layer KV head count (LFM2, Granite 4, Jamba), the layers without KV heads; else,
    with KV heads (Qwen3-Next, Qwen3.5), all but every `full_attention_interval`-th; else (a pure SSM)
    all. Empty for a model without recurrent layers."""
    n_layer = as_int(info.arch_value("block_count"))
    if not n_layer or not is_recurrent_model(info):
        return []
    explicit = info.arch_value("attention.recurrent_layers")
    if isinstance(explicit, tuple) and len(explicit) == n_layer:
        return [bool(v) for v in explicit]
    n_head_kv = info.arch_value("attention.head_count_kv")
    if isinstance(n_head_kv, tuple) and len(n_head_kv) == n_layer:
        return [n == 0 for n in n_head_kv]
    if as_int(n_head_kv):
        interval = as_int(info.arch_value("full_attention_interval")) or _DEFAULT_FULL_ATTENTION_INTERVAL
        return [(i + 1) % interval != 0 for i in range(n_layer)]
    return [True] * n_layer


def recurrent_state_bytes(info: ModelShape, n_seq: int = 1) -> int:
    """The recurrent state llama.cpp keeps per sequence (llama_hparams::n_embd_r + n_embd_s per
    recurrent layer, f32), whatever the context length."""
    layers = sum(recurrent_layers(info))
    if not layers:
        return 0
    n_embd = as_int(info.arch_value("embedding_length")) or 0
    l_cache = as_int(info.arch_value("shortconv.l_cache"))
    if l_cache:  # LFM2: the last L-1 inputs of each short convolution
        per_layer = n_embd * (l_cache - 1)
    else:  # Mamba/Mamba-2/gated DeltaNet: the convolution window and the SSM state
        d_conv = as_int(info.arch_value("ssm.conv_kernel")) or 0
        d_inner = as_int(info.arch_value("ssm.inner_size")) or 0
        d_state = as_int(info.arch_value("ssm.state_size")) or 0
        n_group = as_int(info.arch_value("ssm.group_count")) or 0
        per_layer = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state) + d_state * d_inner
    return n_seq * layers * per_layer * _RECURRENT_BYTES_PER_ELEMENT


def estimated_ram_bytes(info: ModelShape, n_ctx: int) -> int:
    """Rough RAM needed to chat with `n_ctx` tokens of context.

    Weights (the tensor data, memory-mapped) + f16 KV cache + recurrent state + compute buffers
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
    memory = kv_cache_bytes(info, n_ctx) + recurrent_state_bytes(info)
    return info.tensor_data_bytes + memory + _COMPUTE_OVERHEAD_BYTES + scores + activations


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
