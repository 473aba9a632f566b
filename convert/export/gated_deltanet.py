"""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5): linear-attention layers between gated full-attention layers.

`GatedDeltaNetHybrid` is the `ArchModel` base of llama.cpp's qwen3next, qwen35 and qwen35moe,
written as llama.cpp's converter writes them:
- `layer_types` says which layers are linear attention (recurrent: written per layer as
  attention.recurrent_layers) and which full attention (by default every 4th,
  `full_attention_interval`);
- a linear-attention layer's sizes become the ssm.* keys: conv_kernel (the short
  convolution), state_size (key head size), group_count (key heads), time_step_rank (value
  heads) and inner_size (value heads × value head size);
- its tensors: `A_log` is written as A = -exp(A_log), `dt_bias` as ssm_dt.bias, the
  convolution [channels, 1, kernel] as [channels, kernel]; its gated RMSNorm (`linear_attn.norm`)
  as it is;
- every other RMSNorm computes x * (1 + w) in transformers, so 1 is added to its weight
  (input/post-attention norms, the final norm, the attention q/k norms);
- full attention is gated: q_proj yields each head's query and its output gate side by side
  (2 × heads × head_dim rows), kept as they are; RoPE turns only `partial_rotary_factor`
  of each head (rope.dimension_count);
- multi-token-prediction layers (`mtp.*`) are left out, as llama.cpp's converter does with
  --no-mtp: transformers neither loads nor saves them, and the chat does not use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel, CombinedTensor
from convert.export.checkpoint import Checkpoint
from convert.export.mamba2 import negative_exp

LINEAR, FULL = "linear_attention", "full_attention"
# Not part of the language model: multi-token prediction, and Qwen3.5's vision tower.
_NOT_LANGUAGE_MODEL = ("mtp.", "model.mtp.", "model.visual.", "visual.")
_T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class RewrittenTensor(CombinedTensor):
    """One checkpoint tensor whose rows are rearranged (and whose shape may change) on the way
    to one GGUF tensor. `rows` acts on the rows of any [rows, columns] matrix alone, so the
    adapter exporter can apply it to a LoRA B as well (it calls `_piece`)."""

    rows: Callable[[np.ndarray], np.ndarray] = field(default=lambda data: data, compare=False)
    out_shape: tuple[int, ...] = ()

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.out_shape

    def _piece(self, data: np.ndarray) -> np.ndarray:
        return self.rows(data)


class GatedDeltaNetHybrid(ArchModel):
    """What Qwen3-Next and Qwen3.5 share (see the module docstring)."""

    expected_tokenizers = ("gpt2",)  # Qwen's byte-level BPE
    # Qwen3.5's value heads are regrouped from grouped-by-key-head to tiled order (llama.cpp
    # broadcasts the key heads over the value heads); Qwen3-Next's file keeps them grouped.
    tiled_value_heads: ClassVar[bool] = False

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        # The language model's tensors only: an MTP layer's experts must not join a layer's mixture.
        tensors = {n: e for n, e in checkpoint.tensors.items() if not n.startswith(_NOT_LANGUAGE_MODEL)}
        checkpoint = dataclasses.replace(checkpoint, tensors=tensors)
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        hp = self.hparams
        self.n_k = int(self._param("linear_num_key_heads"))
        self.n_v = int(self._param("linear_num_value_heads"))
        self.d_k = int(self._param("linear_key_head_dim"))
        self.d_v = int(self._param("linear_value_head_dim"))
        self.conv_kernel = int(self._param("linear_conv_kernel_dim"))
        self.hidden = int(self._param("hidden_size"))
        self.head_dim = int(hp.get("head_dim") or self.hidden // self.n_head)
        if self.n_k <= 0 or self.n_v % self.n_k:
            raise ConversionError(
                f"linear_num_value_heads ({self.n_v}) is not a multiple of linear_num_key_heads ({self.n_k}): "
                f"llama.cpp's {self.arch_name} shares each key head among a whole number of value heads"
            )
        if hp.get("attention_bias"):
            raise ConversionError(f"attention_bias is set, but llama.cpp's {self.arch_name} has no attention biases")
        self.layer_kinds = self._layer_types()

    # -- hyperparameters -------------------------------------------------------------

    def _layer_types(self) -> list[str]:
        types = self.hparams.get("layer_types")
        if types is None:  # transformers' default: every full_attention_interval-th layer attends fully
            interval = int(self.hparams.get("full_attention_interval") or 4)
            types = [LINEAR if (i + 1) % interval else FULL for i in range(self.block_count)]
        if len(types) != self.block_count or not set(types) <= {LINEAR, FULL}:
            raise ConversionError(
                f"config.json's layer_types must name {LINEAR} or {FULL} for each of the "
                f"{self.block_count} layers; got {types}"
            )
        return list(types)

    def _attention_interval(self) -> int:
        """config.json's full_attention_interval, else the one layer_types follow, else llama.cpp's 4."""
        if self.hparams.get("full_attention_interval") is not None:
            return int(self.hparams["full_attention_interval"])
        for interval in range(1, self.block_count + 1):
            if self.layer_kinds == [LINEAR if (i + 1) % interval else FULL for i in range(self.block_count)]:
                return interval
        return 4

    @property
    def rope_dims(self) -> int:
        factor = self.rope.get("partial_rotary_factor", self.hparams.get("partial_rotary_factor", 0.25))
        return int(self.head_dim * float(factor))

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        hp = self.hparams
        writer.add_block_count(self.block_count)
        writer.add_context_length(int(self._param("max_position_embeddings")))
        writer.add_embedding_length(self.hidden)
        if hp.get("intermediate_size") is not None:  # a MoE's dense width, when its config has one
            writer.add_feed_forward_length(int(hp["intermediate_size"]))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(float(self._param("rms_norm_eps")))
        self._set_rope(writer)
        writer.add_rope_dimension_count(self.rope_dims)
        if self.rope.get("mrope_section") is not None:
            sections = [int(s) for s in self.rope["mrope_section"]][:4]
            writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
        writer.add_ssm_conv_kernel(self.conv_kernel)
        writer.add_ssm_state_size(self.d_k)
        writer.add_ssm_group_count(self.n_k)
        writer.add_ssm_time_step_rank(self.n_v)
        writer.add_ssm_inner_size(self.d_v * self.n_v)
        # llama.cpp's attention.recurrent_layers (the gguf package we pin has no helper for it yet)
        writer.add_array(f"{self.arch_name}.attention.recurrent_layers", [kind == LINEAR for kind in self.layer_kinds])
        writer.add_full_attention_interval(self._attention_interval())

    # -- tensors ---------------------------------------------------------------------

    def skip_tensor(self, name: str) -> bool:
        if name.startswith(_NOT_LANGUAGE_MODEL):
            return True
        return super().skip_tensor(_language_model_name(name))

    def gguf_name(self, name: str) -> str:
        name = _language_model_name(name)
        if name.endswith(".linear_attn.dt_bias"):  # llama.cpp keeps it as the (absent) dt projection's bias
            name = name[: -len("dt_bias")] + "dt_proj.bias"
        return super().gguf_name(name)

    def modify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        if self.tiled_value_heads:
            data = self._tile_value_heads(name, data)
        if name.endswith(".A_log"):
            return negative_exp(data)
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            return data + data.dtype.type(1)  # stored as an offset from 1; in the dtype read, as llama.cpp's converter
        return data

    def moves_values_only(self, name: str, gguf_name: str) -> bool:
        computed = name.endswith(".A_log") or (name.endswith("norm.weight") and "linear_attn.norm" not in name)
        return not computed

    def unmodify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """A_log = log(-A); a norm less its offset (exact: its stored value minus one is what transformers
        adds one back to). Tiled value heads (Qwen3.5, which transformers reads itself) are not undone."""
        if self.tiled_value_heads:
            return super().unmodify_tensor(name, gguf_name, data)
        if name.endswith(".A_log"):
            return np.log(-data.astype(np.float64)).astype(np.float32)
        return data - np.float32(1)

    def _tile_value_heads(self, name: str, data: np.ndarray) -> np.ndarray:
        """Qwen3.5's value-head tensors, from grouped (by key head) to tiled order; rows only,
        except out_proj's columns (its input is the value heads)."""
        if self.n_v == self.n_k or ".linear_attn." not in name:
            return data
        key_dim = self.n_k * self.d_k
        if name.endswith("in_proj_qkv.weight"):
            return np.concatenate([data[: 2 * key_dim], self._tile(data[2 * key_dim :], self.d_v)])
        if name.endswith("in_proj_z.weight"):
            return self._tile(data, self.d_v)
        if name.endswith(("in_proj_a.weight", "in_proj_b.weight", ".A_log", ".dt_bias")):
            return self._tile(data, 1)
        if name.endswith("out_proj.weight"):
            if data.shape[-1] != self.n_v * self.d_v:  # a LoRA B: its columns are not the value heads
                raise ConversionError(
                    f"{name}: llama.cpp's {self.arch_name} takes this projection's input columns in another "
                    "order, which a LoRA pair's B cannot follow; merge the adapter instead (alpaca-convert merge)"
                )
            return self._tile(data.T, self.d_v).T
        return data

    def _tile(self, rows: np.ndarray, head_size: int) -> np.ndarray:
        """Rows [key head, value head of it, head_size] -> [value head of it, key head, head_size]."""
        per_k = self.n_v // self.n_k
        grouped = rows.reshape(self.n_k, per_k, head_size, *rows.shape[1:])
        return np.ascontiguousarray(grouped.swapaxes(0, 1)).reshape(rows.shape)

    def combined_tensors(self) -> list[CombinedTensor]:
        combined = super().combined_tensors()
        for name in sorted(self.checkpoint.tensors):
            if name.endswith(".linear_attn.conv1d.weight") and not self.skip_tensor(name):
                combined.append(self._conv(name))
        return combined

    def _conv(self, name: str) -> RewrittenTensor:
        """The short convolution [channels, 1, kernel] as [channels, kernel] (value channels tiled for Qwen3.5)."""
        shape = self.checkpoint.tensors[name].shape
        self.check_shape(name, self.gguf_name(name), shape)
        key_channels = 2 * self.n_k * self.d_k
        tile = self.tiled_value_heads and self.n_v != self.n_k

        def rows(data: np.ndarray) -> np.ndarray:
            data = data.reshape(data.shape[0], -1)
            if tile:
                data = np.concatenate([data[:key_channels], self._tile(data[key_channels:], self.d_v)])
            return data

        return RewrittenTensor(self.gguf_name(name), (name,), stack=False, rows=rows, out_shape=(shape[0], shape[-1]))

    # -- checks ----------------------------------------------------------------------

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        key_dim, value_dim = self.n_k * self.d_k, self.n_v * self.d_v
        rules = {
            ".self_attn.q_proj.weight": (2 * self.n_head * self.head_dim, self.hidden),  # query + gate
            ".self_attn.q_norm.weight": (self.head_dim,),
            ".self_attn.k_norm.weight": (self.head_dim,),
            ".linear_attn.in_proj_qkv.weight": (2 * key_dim + value_dim, self.hidden),
            ".linear_attn.in_proj_z.weight": (value_dim, self.hidden),
            ".linear_attn.in_proj_a.weight": (self.n_v, self.hidden),
            ".linear_attn.in_proj_b.weight": (self.n_v, self.hidden),
            ".linear_attn.in_proj_qkvz.weight": (2 * key_dim + 2 * value_dim, self.hidden),
            ".linear_attn.in_proj_ba.weight": (2 * self.n_v, self.hidden),
            ".linear_attn.conv1d.weight": (2 * key_dim + value_dim, 1, self.conv_kernel),
            ".linear_attn.A_log": (self.n_v,),
            ".linear_attn.dt_bias": (self.n_v,),
            ".linear_attn.norm.weight": (self.d_v,),
            ".linear_attn.out_proj.weight": (self.hidden, value_dim),
        }
        for suffix, shape in rules.items():
            if name.endswith(suffix):
                return shape
        return super().expected_shape(name, gguf_name)

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        """Every layer has the tensors of its kind (linear or full attention); no base class's
        per-layer attn_q rule, which a linear-attention layer has no tensor for."""
        names = set(gguf_names)
        required = [_name(_T.TOKEN_EMBD), _name(_T.OUTPUT_NORM)]
        if not self.tied_embeddings:
            required.append(_name(_T.OUTPUT))
        for bid, kind in enumerate(self.layer_kinds):
            kinds = _LINEAR_TENSORS if kind == LINEAR else _FULL_TENSORS
            required += [_name(k, bid) for k in (*kinds, _T.ATTN_NORM, _T.ATTN_POST_NORM)]
        missing = [n for n in required if n not in names]
        if missing:
            bid = missing[0].split(".")[1] if missing[0].startswith("blk.") else None
            where = f" (layer {bid} is {self.layer_kinds[int(bid)].replace('_', ' ')})" if bid else ""
            raise ConversionError(
                f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}{where}"
            )


_LINEAR_TENSORS = (_T.ATTN_QKV, _T.ATTN_GATE, _T.SSM_CONV1D, _T.SSM_A, _T.SSM_NORM, _T.SSM_OUT)
_FULL_TENSORS = (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT, _T.ATTN_Q_NORM, _T.ATTN_K_NORM)


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    bare = gguf.TENSOR_NAMES[kind].format(bid=bid)
    return bare if kind is _T.SSM_A else bare + ".weight"  # A_log is a bare parameter


def _language_model_name(name: str) -> str:
    """A conditional-generation checkpoint's language-model tensor under the causal LM's name."""
    return name.replace("model.language_model.", "model.", 1)
