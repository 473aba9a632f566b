"""LFM2 (Liquid): gated short convolutions and attention layers, as llama.cpp's lfm2 architecture.

What differs from a plain transformer:
- `layer_types` says which blocks are short convolutions ("conv") and which attention
  ("full_attention"); llama.cpp tells them apart by a per-layer `head_count_kv`, 0 for a
  convolution block. Older configs give `full_attn_idxs` instead, as transformers reads them.
- A convolution block projects to B, C, x (`conv.in_proj`, 3 × hidden rows), runs a causal
  depthwise convolution of `conv_L_cache` taps over B·x (`conv.conv`, stored (hidden, 1, L) by
  torch's Conv1d and (hidden, L) by llama.cpp), gates it by C and projects back (`conv.out_proj`).
  llama.cpp has no place for their biases (`conv_bias`), so such a checkpoint is refused.
- The FFN width is not `block_ff_dim` (or `intermediate_size`) itself: transformers takes 2/3 of it,
  times `block_ffn_dim_multiplier`, rounded up to `block_multiple_of`, when
  `block_auto_adjust_ff_dim` is set. Without a multiplier transformers skips the rounding too,
  where llama.cpp's converter rounds anyway; the width written here is the one transformers
  builds (and the weights have).
- Attention normalizes each head's q and k (`q_layernorm`/`k_layernorm`), uses Hugging Face's
  half-split rotary layout (no permutation), and its output projection maps all heads to hidden
  size, so `head_dim × heads` must equal `hidden_size`.
- The final norm is `model.embedding_norm`; llama.cpp reads it as `token_embd_norm`.
- Embeddings are tied unless config.json says otherwise (`tie_word_embeddings`, or the older
  `tie_embedding`): LFM2's default is tied.
LFM2's tokenizer splits text as Llama 3's does; llama.cpp names it "lfm2".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel, CombinedTensor
from convert.export.checkpoint import Checkpoint
from convert.export.registry import register

CONV, ATTENTION = "conv", "full_attention"
# transformers' Lfm2Config defaults, for a config.json that leaves a key out.
_FF_DEFAULTS = {"block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256}


@register("Lfm2ForCausalLM", "LFM2ForCausalLM")
class Lfm2Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.LFM2
    expected_tokenizers = ("gpt2",)
    pre_tokenizer_names = {"llama-bpe": "lfm2"}

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        hp = self.hparams
        # As transformers reads it: the older tie_embedding wins over tie_word_embeddings; LFM2's default is tied.
        self.tied_embeddings = bool(first_of(hp, ("tie_embedding", "tie_word_embeddings"), True))
        self.n_embd = int(self._param("hidden_size"))
        self.layer_types = layer_types(hp, self.block_count)
        self.ff_length = self.dense_ffn_width()
        self.l_cache = int(self._param("conv_L_cache"))
        if self.l_cache < 2:
            raise ConversionError(f"config.json's conv_L_cache is {self.l_cache}; llama.cpp's lfm2 needs at least 2")
        if hp.get("conv_bias"):
            raise ConversionError(
                "this LFM2 checkpoint has convolution biases (conv_bias: true), which llama.cpp's lfm2 cannot run"
            )
        self.head_dim = int(hp.get("head_dim") or self.n_embd // self.n_head)
        if self.head_dim * self.n_head != self.n_embd:
            raise ConversionError(
                f"config.json's head_dim × num_attention_heads is {self.head_dim} × {self.n_head}, not hidden_size "
                f"{self.n_embd}: llama.cpp's lfm2 projects attention back from hidden_size"
            )

    def dense_ffn_width(self) -> int:
        """The width of the dense feed-forward blocks (feed_forward_length)."""
        return feed_forward_length(self.hparams)

    # -- hyperparameters ---------------------------------------------------------

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.block_count)
        writer.add_context_length(int(self._param("max_position_embeddings")))
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.ff_length)
        writer.add_head_count(self.n_head)
        # One entry per layer: llama.cpp runs a layer with no KV heads as a short convolution.
        writer.add_head_count_kv([self.n_head_kv if kind == ATTENTION else 0 for kind in self.layer_types])
        self._set_rope(writer)
        writer.add_layer_norm_rms_eps(float(self._param("norm_eps", "rms_norm_eps")))
        if self.hparams.get("head_dim") is not None:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_vocab_size(int(self._param("vocab_size")))
        writer.add_shortconv_l_cache(self.l_cache)

    # -- tensors -------------------------------------------------------------------

    def combined_tensors(self) -> list[CombinedTensor]:
        """Each convolution kernel without torch's singleton channel axis: (hidden, 1, L) -> (hidden, L)."""
        kernels = []
        for name, entry in self.checkpoint.tensors.items():
            if not name.endswith(".conv.conv.weight"):
                continue
            if tuple(entry.shape) != (self.n_embd, 1, self.l_cache):
                raise ConversionError(
                    f"tensor {name} has shape {list(entry.shape)}, but config.json implies "
                    f"{[self.n_embd, 1, self.l_cache]} (hidden_size, 1, conv_L_cache): "
                    "the config and the weights disagree"
                )
            kernels.append(ConvKernel(self.gguf_name(name), (name,), stack=False))
        return kernels

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        if name.endswith(".conv.in_proj.weight"):
            return (3 * self.n_embd, self.n_embd)
        if name.endswith(".conv.out_proj.weight"):
            return (self.n_embd, self.n_embd)
        if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
            return (self.head_dim,)
        return super().expected_shape(name, gguf_name)

    def _shape_dims(self) -> dict[str, int | None]:
        # The FFN tensors have the adjusted width, not config.json's intermediate_size.
        dims = super()._shape_dims()
        dims["intermediate_size"] = self.ff_length
        return dims

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        """Every layer has what llama.cpp's lfm2 loads for its kind; no attention tensor in a conv layer."""
        names = set(gguf_names)
        required = [tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD), tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD_NORM)]
        if not self.tied_embeddings:
            required.append(tensor_name(gguf.MODEL_TENSOR.OUTPUT))
        for bid, kind in enumerate(self.layer_types):
            own, other = _ATTENTION_TENSORS, _CONV_TENSORS
            if kind == CONV:
                own, other = other, own
            required += [tensor_name(t, bid) for t in (*_LAYER_TENSORS, *own)] + self.ffn_tensors(bid)
            stray = [tensor_name(t, bid) for t in other if tensor_name(t, bid) in names]
            if stray:
                raise ConversionError(
                    f"layer {bid} is a {kind} layer in config.json's layer_types, but the checkpoint has {stray[0]}"
                )
        missing = [n for n in required if n not in names]
        if missing:
            raise ConversionError(f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}")

    def ffn_tensors(self, bid: int) -> list[str]:
        """The GGUF tensors of layer `bid`'s feed-forward block (a dense SwiGLU here)."""
        return [tensor_name(t, bid) for t in _DENSE_FFN_TENSORS]


@dataclass(frozen=True)
class ConvKernel(CombinedTensor):
    """A depthwise Conv1d weight as llama.cpp's ssm_conv reads it: its middle (in-channel) axis dropped."""

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (source_shape[0], source_shape[-1])

    def assemble(self, read: Callable[[str], np.ndarray], dtype: np.dtype) -> np.ndarray:
        data = read(self.sources[0])
        return np.ascontiguousarray(data.reshape(data.shape[0], data.shape[-1]), dtype=dtype)


# -- config.json ------------------------------------------------------------------------


def layer_types(hp: dict, block_count: int) -> list[str]:
    """Each layer's kind, from `layer_types` or, in older configs, `full_attn_idxs` (as transformers reads them)."""
    kinds = hp.get("layer_types")
    if kinds is None:
        attention = hp.get("full_attn_idxs")
        attention = range(block_count) if attention is None else {int(i) for i in attention}
        kinds = [ATTENTION if i in attention else CONV for i in range(block_count)]
    kinds = list(kinds)
    if len(kinds) != block_count:
        raise ConversionError(f"config.json's layer_types has {len(kinds)} entries for {block_count} layers")
    unknown = sorted({k for k in kinds if k not in (CONV, ATTENTION)})
    if unknown:
        raise ConversionError(
            f"config.json's layer_types has {unknown[0]!r}; llama.cpp's lfm2 runs only "
            f"{CONV!r} and {ATTENTION!r} layers"
        )
    return kinds


def feed_forward_length(hp: dict) -> int:
    """The FFN width transformers' Lfm2MLP builds from config.json."""
    width = first_of(hp, ("block_ff_dim", "intermediate_size"), None)
    if width is None:
        raise ConversionError("config.json has none of block_ff_dim, intermediate_size")
    width = int(width)
    settings = {key: hp.get(key, default) for key, default in _FF_DEFAULTS.items()}
    if not settings["block_auto_adjust_ff_dim"]:
        return width
    width = int(2 * width / 3)
    multiplier = settings["block_ffn_dim_multiplier"]
    if multiplier is None:  # transformers rounds only after a multiplier
        return width
    multiple = int(settings["block_multiple_of"])
    if multiple < 1:
        raise ConversionError(f"config.json's block_multiple_of is {multiple}; it must be at least 1")
    width = int(multiplier * width)
    return multiple * ((width + multiple - 1) // multiple)


def first_of(hp: dict, keys: tuple[str, ...], default):
    for key in keys:
        if hp.get(key) is not None:
            return hp[key]
    return default


_T = gguf.MODEL_TENSOR
_LAYER_TENSORS = (_T.ATTN_NORM, _T.FFN_NORM)
_DENSE_FFN_TENSORS = (_T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN)
_ATTENTION_TENSORS = (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT, _T.ATTN_Q_NORM, _T.ATTN_K_NORM)
_CONV_TENSORS = (_T.SHORTCONV_CONV, _T.SHORTCONV_INPROJ, _T.SHORTCONV_OUTPROJ)


def tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + suffix
