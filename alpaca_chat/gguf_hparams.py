"""The hyperparameter rules of a GGUF header: types, bounds, finiteness, consistency with the tensors.

llama.cpp reads the hyperparameters into fixed-size arrays and uses them before it checks a single
tensor shape: a block count of 2**31 allocates per-layer vectors until the OOM killer comes, a NaN
epsilon trips a GGML_ASSERT (SIGABRT), a head count of 0 divides by zero. So `check_hyperparameters`
checks them on what `gguf_parse` read, and raises InvalidModelFileError with one line naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from alpaca_chat.errors import InvalidModelFileError
from alpaca_chat.gguf_parse import ABSURD_COUNT, VT, TensorInfo, gguf, printable

_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h)
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_MAX_CONTEXT = 1 << 26  # 64 Mi tokens; the longest published context is 10 Mi
_MAX_WIDTH = 1 << 20  # embedding / feed-forward length
_MAX_HEADS = 1 << 12
_MAX_HEAD_DIM = 1 << 13
_MAX_CONV_KERNEL = 1 << 10  # published short convolutions are 3 or 4 wide
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
_INT_TYPES = {VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64}
_FLOAT_TYPES = {VT.FLOAT32, VT.FLOAT64}

# Integer keys (suffix after "{arch}."): (lowest, highest) allowed.
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "block_count": (1, _MAX_LAYERS),
    "context_length": (1, _MAX_CONTEXT),
    "embedding_length": (1, _MAX_WIDTH),
    "embedding_length_out": (0, _MAX_WIDTH),
    "feed_forward_length": (0, _MAX_WIDTH),
    "expert_feed_forward_length": (0, _MAX_WIDTH),
    "expert_shared_feed_forward_length": (0, _MAX_WIDTH),
    "attention.head_count": (0, _MAX_HEADS),
    "attention.head_count_kv": (0, _MAX_HEADS),
    "attention.key_length": (1, _MAX_HEAD_DIM),
    "attention.value_length": (1, _MAX_HEAD_DIM),
    "attention.key_length_swa": (1, _MAX_HEAD_DIM),
    "attention.value_length_swa": (1, _MAX_HEAD_DIM),
    "attention.sliding_window": (0, _MAX_CONTEXT),
    "rope.dimension_count": (1, _MAX_HEAD_DIM),  # 0: llama.cpp hangs building the rope of a rope model
    "rope.dimension_count_swa": (0, _MAX_HEAD_DIM),
    "rope.scaling.original_context_length": (0, _MAX_CONTEXT),
    "vocab_size": (1, ABSURD_COUNT),
    "expert_count": (0, _MAX_EXPERTS),
    "expert_used_count": (0, _MAX_EXPERTS),
    "expert_shared_count": (0, _MAX_EXPERTS),
    "expert_group_count": (0, _MAX_EXPERTS),
    "expert_group_used_count": (0, _MAX_EXPERTS),
    "leading_dense_block_count": (0, _MAX_LAYERS),
    "nextn_predict_layers": (0, _MAX_LAYERS),
    "interleave_moe_layer_step": (0, _MAX_LAYERS),
    # llama.cpp's llama_expert_gating_func_type: softmax, sigmoid, softmax on the weights, sqrt-softplus.
    # 0 ("none") or an unknown value leaves MoE routing undefined (the fuzz campaign hung llama.cpp).
    "expert_gating_func": (1, 4),
    # Recurrent layers (Mamba, gated DeltaNet, LFM2's short convolutions): llama.cpp sizes every
    # sequence's state from these, and Qwen3-Next's layer pattern divides by the interval.
    "ssm.conv_kernel": (0, _MAX_CONV_KERNEL),
    "ssm.inner_size": (0, _MAX_WIDTH),
    "ssm.state_size": (0, _MAX_HEAD_DIM),
    "ssm.time_step_rank": (0, _MAX_WIDTH),
    "ssm.group_count": (0, _MAX_HEADS),
    "shortconv.l_cache": (0, _MAX_CONV_KERNEL),
    "full_attention_interval": (1, _MAX_LAYERS),
}
# Float keys: (lowest, highest, lowest allowed exclusive?) on top of being finite.
_FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "attention.layer_norm_rms_epsilon": (0.0, 1.0, False),
    "attention.layer_norm_epsilon": (0.0, 1.0, False),
    "attention.group_norm_epsilon": (0.0, 1.0, False),
    "rope.freq_base": (0.0, 1e12, True),
    "rope.freq_base_swa": (0.0, 1e12, True),
    "rope.scaling.factor": (0.0, 1e6, False),
    "rope.scale_linear": (0.0, 1e6, False),
    "rope.scaling.attn_factor": (0.0, 1e6, False),
    "rope.scaling.yarn_log_multiplier": (-1e6, 1e6, False),
    "attention.logit_softcapping": (0.0, 1e6, False),
    "final_logit_softcapping": (0.0, 1e6, False),
    "attention.scale": (0.0, 1e6, False),
    "embedding_scale": (-1e6, 1e6, False),
    "residual_scale": (-1e6, 1e6, False),
    "logit_scale": (-1e6, 1e6, False),
    "expert_weights_scale": (-1e6, 1e6, False),
}
# Per-layer keys: one value, or an array with one value per layer.
_PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")
# Families whose attention/feed-forward tensors have the standard shapes checked below; for others only
# the architecture-independent checks apply (fused or gated projections differ between families).
_STANDARD_SHAPES = frozenset({
    "llama", "mistral3", "qwen2", "qwen3", "qwen3moe", "qwen2moe", "gemma", "gemma2", "gemma3", "phi3",
    "smollm3", "granite", "granitemoe", "olmo", "olmo2", "olmoe", "glm4", "chatglm", "starcoder2",
    "stablelm", "internlm2", "exaone", "cohere2", "command-r", "ernie4_5", "hunyuan-dense",
})


def check_hyperparameters(
    display: str,
    arch: str,
    md: Mapping[str, Any],
    types: Mapping[str, int],
    array_lengths: Mapping[str, int],
    tensors: list[TensorInfo],
) -> None:
    """Raise InvalidModelFileError (one line naming the key) for a hyperparameter llama.cpp cannot survive."""
    prefix = f"{arch}."

    def fail(key: str, detail: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{display}: {printable(key, 80)} {detail}; the file is corrupt or was converted wrongly")

    # Special token ids: llama.cpp reads them as uint32 and refuses any other type.
    for key, vtype in types.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and vtype != VT.UINT32:
            raise fail(key, f"has the wrong type ({_type_name(vtype)}, not uint32)")

    # Every float under the architecture, scalar or small array, must be finite.
    for key, value in md.items():
        if not key.startswith(prefix):
            continue
        values = value if isinstance(value, tuple) else (value,)
        if any(type(v) is float and not math.isfinite(v) for v in values):
            raise fail(key, f"is {_fmt(value)}, not a finite number")

    def scalar(suffix: str, *, per_layer: bool = False) -> Any:
        key = prefix + suffix
        if key not in md and key not in array_lengths:
            return None
        vtype = types.get(key)
        if vtype == VT.ARRAY:
            if not per_layer:
                raise fail(key, "is an array, where llama.cpp reads one value")
            if key not in md:
                raise fail(key, f"has {array_lengths[key]} elements, more than {_MAX_LAYERS} layers")
            return md[key]
        return md[key]

    ints: dict[str, Any] = {}
    for suffix, (low, high) in _INT_BOUNDS.items():
        key = prefix + suffix
        value = scalar(suffix, per_layer=suffix in _PER_LAYER)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and any(type(v) is not int for v in values):
            raise fail(key, "is not an array of integers")
        if not isinstance(value, tuple) and types.get(key) not in _INT_TYPES:
            raise fail(key, f"has the wrong type ({_type_name(types.get(key))}, not an integer)")
        for v in values:
            if not low <= v <= high:
                raise fail(key, f"is {v}, outside {low}..{high}")
        ints[suffix] = value
    for suffix, (low, high, exclusive) in _FLOAT_BOUNDS.items():
        key = prefix + suffix
        value = scalar(suffix)
        if value is None:
            continue
        if types.get(key) not in _FLOAT_TYPES:
            raise fail(key, f"has the wrong type ({_type_name(types.get(key))}, not a float)")
        if value < low or value > high or (exclusive and value == low):
            bound = f"above {low:g}" if exclusive else f"at least {low:g}"
            raise fail(key, f"is {value:g}, not {bound} and at most {high:g}")
    scaling = md.get(prefix + "rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise fail(prefix + "rope.scaling.type", f"is '{printable(str(scaling))}', not one of {', '.join(_ROPE_SCALING_TYPES)}")

    by_name = {t.name: t for t in tensors}
    n_layer = ints.get("block_count")
    _check_layers(fail, prefix, n_layer, by_name, ints, array_lengths)
    if n_layer is None:
        return
    _check_experts(fail, prefix, ints, n_layer, by_name)
    _check_recurrent(fail, prefix, ints, n_layer, by_name)
    _check_widths(fail, prefix, arch, md, ints, n_layer, by_name, array_lengths)


def _check_layers(fail, prefix, n_layer, by_name, ints, array_lengths) -> None:
    layers = set()
    for name in by_name:
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            if index.isdigit():
                layers.add(int(index))
    key = prefix + "block_count"
    if n_layer is None:
        if layers:
            raise fail(key, f"is missing, but the file has {max(layers) + 1} blocks of tensors")
        return
    if layers and max(layers) + 1 != n_layer:
        raise fail(key, f"is {n_layer}, but the file has tensors for {max(layers) + 1} blocks")
    for suffix in _PER_LAYER:
        value = ints.get(suffix)
        if isinstance(value, tuple) and len(value) != n_layer:
            raise fail(prefix + suffix, f"has {len(value)} per-layer values for {n_layer} blocks")
    nextn = ints.get("nextn_predict_layers", 0)
    if nextn > n_layer:
        raise fail(prefix + "nextn_predict_layers", f"is {nextn}, more than the {n_layer} blocks")
    dense = ints.get("leading_dense_block_count", 0)
    if dense > n_layer:
        raise fail(prefix + "leading_dense_block_count", f"is {dense}, more than the {n_layer} blocks")


def _check_experts(fail, prefix, ints, n_layer, by_name) -> None:
    """The asserts of llama_model_base::load_hparams about experts, as one-line errors."""
    n_expert = ints.get("expert_count", 0)
    used = _layer_values(ints.get("expert_used_count", 0), n_layer)
    groups = ints.get("expert_group_count", 0)
    used_key = prefix + "expert_used_count"
    if max(used) > n_expert:
        raise fail(used_key, f"is {max(used)}, more than expert_count {n_expert}")
    if n_expert > 0:
        if max(used) == 0:
            raise fail(used_key, f"is 0 but {prefix}expert_count is {n_expert}")
        if groups >= n_expert:
            raise fail(prefix + "expert_group_count", f"is {groups}, not below expert_count {n_expert}")
        if groups > 1:
            group_used = ints.get("expert_group_used_count", 0)
            if n_expert % groups:
                raise fail(prefix + "expert_group_count", f"{groups} does not divide expert_count {n_expert}")
            if not 0 < group_used < groups:
                raise fail(prefix + "expert_group_used_count", f"is {group_used}, not in 1..{groups - 1}")
    elif groups:
        raise fail(prefix + "expert_group_count", f"is {groups} in a model without experts")
    for i in range(n_layer):
        for part in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            t = by_name.get(f"blk.{i}.{part}.weight")
            if t is not None and (len(t.shape) < 3 or t.shape[2] != n_expert):
                got = t.shape[2] if len(t.shape) >= 3 else 1
                raise fail(prefix + "expert_count", f"is {n_expert}, but tensor '{t.name}' holds {got} experts")


def _check_recurrent(fail, prefix, ints, n_layer, by_name) -> None:
    """A recurrent layer's convolution window must be the one the hyperparameters size its state by:
    llama.cpp allocates each sequence's state from them and copies the window into it (a zero inner
    size measured a hang in the fuzz campaign, a wrong one writes out of the state)."""
    l_cache = ints.get("shortconv.l_cache")
    n_embd = ints.get("embedding_length")
    d_conv, d_inner = ints.get("ssm.conv_kernel"), ints.get("ssm.inner_size")
    d_state, n_group = ints.get("ssm.state_size", 0), ints.get("ssm.group_count", 0)
    for il in range(n_layer):
        short = by_name.get(f"blk.{il}.shortconv.conv.weight")
        if short is not None:
            key = prefix + "shortconv.l_cache"
            if l_cache is None or short.shape[:2] != (l_cache, n_embd):
                raise fail(key, f"is {l_cache} with {short.name} of shape {short.shape}, not ({l_cache}, {n_embd})")
        conv = by_name.get(f"blk.{il}.ssm_conv1d.weight")
        if conv is not None:
            channels = (d_inner or 0) + 2 * n_group * d_state
            if not d_conv or not d_inner or conv.shape[:2] != (d_conv, channels):
                raise fail(prefix + "ssm.inner_size",
                           f"is {d_inner} (conv_kernel {d_conv}, state_size {d_state}, group_count {n_group}),"
                           f" which does not match {conv.name} of shape {conv.shape}")


def _check_widths(fail, prefix, arch, md, ints, n_layer, by_name, array_lengths) -> None:
    """Embedding, head and feed-forward sizes: divisible as llama.cpp assumes, and matching the tensors."""
    n_embd = ints.get("embedding_length")
    embd_key = prefix + "embedding_length"
    n_tokens = array_lengths.get(gguf.Keys.Tokenizer.LIST)
    for name in ("token_embd.weight", "output.weight"):
        t = by_name.get(name)
        if t is None or len(t.shape) != 2:
            continue
        if n_embd is not None and t.shape[0] != n_embd and arch in _STANDARD_SHAPES:
            raise fail(embd_key, f"is {n_embd}, but tensor '{name}' has rows of {t.shape[0]}")
        if n_tokens is not None and t.shape[1] != n_tokens:
            raise fail(gguf.Keys.Tokenizer.LIST, f"has {n_tokens} tokens, but tensor '{name}' has {t.shape[1]} rows")
    vocab = ints.get("vocab_size")
    if vocab is not None and n_tokens is not None and vocab != n_tokens:
        raise fail(prefix + "vocab_size", f"is {vocab}, but {gguf.Keys.Tokenizer.LIST} has {n_tokens} tokens")
    heads = _layer_values(ints.get("attention.head_count", 0), n_layer)
    heads_kv = _layer_values(ints.get("attention.head_count_kv", ints.get("attention.head_count", 0)), n_layer)
    kv_key = prefix + "attention.head_count_kv"
    for i, (h, kv) in enumerate(zip(heads, heads_kv)):
        if kv > h or (kv and h % kv):
            raise fail(kv_key, f"is {kv} in block {i}, which does not divide head_count {h}")
    if n_embd is None or not heads[0]:
        return
    head_k = ints.get("attention.key_length")
    head_v = ints.get("attention.value_length")
    if head_k is None or head_v is None:
        if n_embd % heads[0]:
            raise fail(prefix + "attention.head_count", f"is {heads[0]}, which does not divide embedding_length {n_embd}")
        head_k = head_k or n_embd // heads[0]
        head_v = head_v or n_embd // heads[0]
    n_rot = ints.get("rope.dimension_count")
    if n_rot is not None and (n_rot > head_k or n_rot % 2):
        raise fail(prefix + "rope.dimension_count", f"is {n_rot}, not an even number up to the head size {head_k}")
    if arch not in _STANDARD_SHAPES:
        return
    n_ff = _layer_values(ints.get("feed_forward_length", 0), n_layer)
    n_ff_exp = ints.get("expert_feed_forward_length")
    for i in range(n_layer):
        h, kv = heads[i], heads_kv[i]
        expected = {
            "attn_q": (h * head_k, "attention.head_count"),
            "attn_k": (kv * head_k, "attention.head_count_kv"),
            "attn_v": (kv * head_v, "attention.head_count_kv"),
            "attn_qkv": (h * head_k + kv * (head_k + head_v), "attention.head_count_kv"),
        }
        for part, (width, suffix) in expected.items():
            t = by_name.get(f"blk.{i}.{part}.weight")
            if t is not None and len(t.shape) == 2 and t.shape[1] != width:
                raise fail(prefix + suffix, f"does not match tensor '{t.name}' of shape {list(t.shape)}")
        t = by_name.get(f"blk.{i}.ffn_down.weight")
        if t is not None and len(t.shape) == 2 and t.shape[0] != n_ff[i]:
            raise fail(prefix + "feed_forward_length", f"is {n_ff[i]}, but tensor '{t.name}' has rows of {t.shape[0]}")
        t = by_name.get(f"blk.{i}.ffn_down_exps.weight")
        if t is not None and n_ff_exp is not None and t.shape[0] != n_ff_exp:
            raise fail(prefix + "expert_feed_forward_length", f"is {n_ff_exp}, but tensor '{t.name}' has rows of {t.shape[0]}")


def _layer_values(value: Any, n_layer: int) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value] * n_layer


def _type_name(vtype: int | None) -> str:
    try:
        return VT(vtype).name.lower()
    except ValueError:
        return str(vtype)


def _fmt(value: Any) -> str:
    return str(value) if not isinstance(value, tuple) else f"an array containing {next(v for v in value if type(v) is float and not math.isfinite(v))}"
