"""Granite 4 (GraniteMoeHybridForCausalLM): Mamba-2 and attention layers, experts or a dense MLP.

llama.cpp's granitehybrid architecture. Every layer has a norm, then either a Mamba-2
mixer (convert/export/mamba2.py) or Granite's attention, then a feed-forward block:
- with experts (Granite 4.0 H Tiny/Small): a router, experts stored fused (one
  `input_linear` of gate then up rows per layer, split here, one `output_linear`) and a
  shared expert (`shared_mlp`) added to them;
- without (`num_local_experts: 0`, Granite 4.0 H Micro): `shared_mlp` is the dense MLP,
  its width `shared_intermediate_size`.

What llama.cpp needs beyond the tensors:
- which layers are Mamba: it takes a layer with head_count_kv 0 for a recurrent one, so
  head_count_kv is written per layer. config.json's `layer_types` says which: released
  checkpoints spell them "mamba"/"attention", transformers 5 saves "linear_attention"/
  "full_attention"; both are read (llama.cpp's converter knows only the first and takes
  every layer of a transformers 5 save for a Mamba layer);
- rope or none: `position_embedding_type: rope` uses rope on the attention layers, anything
  else none (NoPE, every released hybrid). llama.cpp reads `rope.scaling.finetuned` as that
  switch; its converter writes false for every hybrid, which is right for NoPE only. A NoPE
  model has no trained length: 2**20 is written as its context length, as llama.cpp's does;
- Granite's four multipliers, written as Granite 3's exporter writes them.

Granite 4 checkpoints with attention layers only (the non-"H" models, e.g. Granite 4.0 Micro) have the same class
and tensors; they become llama.cpp's plain granite (or granitemoe, with experts), with rope, as
llama.cpp's converter does.

llama.cpp supports mamba_expand 2 only, SiLU, and no in_proj/out_proj biases: others are refused.
Granite 4's tokenizer splits text like GPT-4's (the Llama 3 regex); llama.cpp names it "dbrx".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export import mamba2
from convert.export.base import CombinedTensor
from convert.export.checkpoint import Checkpoint
from convert.export.granite import multipliers_from_gguf, write_multipliers
from convert.export.llama import LlamaModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

_T = gguf.MODEL_TENSOR
# config.json's layer_types -> is a Mamba layer; transformers 5 saves the second spelling of each.
LAYER_TYPES = {"mamba": True, "linear_attention": True, "attention": False, "full_attention": False}
# A NoPE model has no trained length; llama.cpp's converter writes this one.
NOPE_CONTEXT = 2**20
_LAYER = re.compile(r"(?:^|\.)layers\.(?P<bid>\d+)\.")
_MIXER = re.compile(r"(?:^|\.)layers\.(?P<bid>\d+)\.mamba\.(?P<suffix>.+)$")
_FUSED_UP = re.compile(r"layers\.(?P<bid>\d+)\.(?:block_sparse_moe\.(?:input_linear\.weight|experts\.gate_up_proj)"
                       r"|shared_mlp\.input_linear\.weight)$")


@register("GraniteMoeHybridForCausalLM")
class GraniteHybridModel(LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.GRANITE_HYBRID
    expected_tokenizers = ("gpt2",)
    pre_tokenizer_names = {"llama-bpe": "dbrx"}

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        hp = self.hparams
        self.mamba_layers = mamba_layers(hp, self.block_count)
        self._check_layer_kinds()
        self.n_expert = int(hp.get("num_local_experts") or 0)
        self.uses_rope = hp.get("position_embedding_type") == "rope"
        self.hybrid = any(self.mamba_layers)
        self.mamba = mamba2.granite_mamba2_dims(hp) if self.hybrid else None
        if not self.hybrid:  # all attention (non-"H" Granite 4, e.g. Micro): plain granite
            self.gguf_arch = gguf.MODEL_ARCH.GRANITE_MOE if self.n_expert else gguf.MODEL_ARCH.GRANITE
            self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        self._check_supported()

    def _check_layer_kinds(self) -> None:
        """Each layer's tensors must be of the kind layer_types says (a mismatch would load as garbage)."""
        kinds: dict[int, set[str]] = {}
        for name in self.checkpoint.tensors:
            if m := re.search(r"(?:^|\.)layers\.(\d+)\.(mamba|self_attn)\.", name):
                kinds.setdefault(int(m[1]), set()).add(m[2])
        for bid, mamba in enumerate(self.mamba_layers):
            found = kinds.get(bid, set())
            if found and found != {"mamba" if mamba else "self_attn"}:
                said = "a Mamba" if mamba else "an attention"
                raise ConversionError(
                    f"layer {bid} is {said} layer in config.json's layer_types, but the checkpoint holds "
                    f"{' and '.join(sorted(found))} tensors for it: the config and the weights disagree"
                )

    def _check_supported(self) -> None:
        hp = self.hparams
        if (hp.get("hidden_act") or "silu") != "silu":
            raise ConversionError(
                f"llama.cpp's {self.arch_name} uses SiLU; this checkpoint's hidden_act is {hp['hidden_act']}"
            )
        if not self.hybrid:
            if not self.uses_rope:
                raise ConversionError(
                    f"this Granite 4 checkpoint has attention layers only and no rope (position_embedding_type "
                    f"{hp.get('position_embedding_type')!r}), but llama.cpp's {self.arch_name} always applies rope"
                )
        elif self.mamba.d_inner != 2 * int(self._param("hidden_size")):
            raise ConversionError("llama.cpp's granitehybrid supports mamba_expand 2 only (inner size = 2 × hidden)")
        elif hp.get("mamba_proj_bias"):
            raise ConversionError("mamba_proj_bias is true: llama.cpp's granitehybrid has no in_proj/out_proj bias")
        head_dim = hp.get("head_dim")
        if head_dim is not None and int(head_dim) != int(self._param("hidden_size")) // self.n_head:
            raise ConversionError(
                f"config.json's head_dim is {head_dim}, but Granite's attention uses hidden_size / "
                f"num_attention_heads = {int(hp['hidden_size']) // self.n_head}"
            )
        if self.hybrid:
            mamba2.check_time_step_limit(hp)

    # -- hyperparameters -----------------------------------------------------------------

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        hp = self.hparams
        writer.add_block_count(self.block_count)
        context = int(self._param("max_position_embeddings")) if self.uses_rope else NOPE_CONTEXT
        writer.add_context_length(context)
        writer.add_embedding_length(int(self._param("hidden_size")))
        writer.add_feed_forward_length(self.ffn_length)
        writer.add_head_count(self.n_head)
        if self.hybrid:
            writer.add_head_count_kv([0 if mamba else self.n_head_kv for mamba in self.mamba_layers])
            writer.add_rope_scaling_finetuned(self.uses_rope)  # granitehybrid's "use rope" switch
        else:
            writer.add_head_count_kv(self.n_head_kv)
        if self.uses_rope:
            self._set_rope(writer)
        elif self.rope.get("rope_theta") is not None:  # unused, but llama.cpp's converter writes it
            writer.add_rope_freq_base(float(self.rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(self._param("rms_norm_eps")))
        writer.add_vocab_size(int(self._param("vocab_size")))
        writer.add_rope_dimension_count(self.head_dim)
        write_multipliers(hp, writer)
        # Written without experts too (0 and 0), as llama.cpp's converter writes them for Granite 4.0 H Micro.
        writer.add_expert_count(self.n_expert)
        writer.add_expert_used_count(self.n_expert_used)
        if hp.get("shared_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(int(hp["shared_intermediate_size"]))
        if self.mamba is not None:
            self.mamba.write(writer)

    @property
    def n_expert_used(self) -> int:
        """Experts per token; 0 without experts, whatever config.json says (llama.cpp asserts used <= count)."""
        if not self.n_expert:
            return 0
        used = int(self._param("num_experts_per_tok"))
        if not 0 < used <= self.n_expert:
            raise ConversionError(
                f"config.json's num_experts_per_tok is {used}, but there are {self.n_expert} experts"
            )
        return used

    @property
    def ffn_length(self) -> int:
        """An expert's width, or, without experts, the dense MLP's (shared_intermediate_size)."""
        key = "intermediate_size" if self.n_expert else "shared_intermediate_size"
        return int(self._param(key))

    @property
    def head_dim(self) -> int:
        return int(self._param("hidden_size")) // self.n_head

    # -- tensors -------------------------------------------------------------------------

    def skip_tensor(self, name: str) -> bool:
        if (m := _MIXER.search(name)) and m["suffix"] in mamba2.RESHAPED:
            return True  # written by extra_tensors, reshaped
        return super().skip_tensor(name)

    def gguf_name(self, name: str) -> str:
        if m := _MIXER.search(name):
            kind, suffix = mamba2.gguf_kind(m["suffix"])
            return gguf.TENSOR_NAMES[kind].format(bid=int(m["bid"])) + suffix
        if name.endswith(".block_sparse_moe.router.weight"):  # transformers 5's name in memory
            return gguf.TENSOR_NAMES[_T.FFN_GATE_INP].format(bid=_bid(name)) + ".weight"
        if name.endswith(".block_sparse_moe.experts.down_proj"):
            return gguf.TENSOR_NAMES[_T.FFN_DOWN_EXP].format(bid=_bid(name)) + ".weight"
        if name.endswith(".shared_mlp.output_linear.weight") and not self.n_expert:
            return gguf.TENSOR_NAMES[_T.FFN_DOWN].format(bid=_bid(name)) + ".weight"
        return super().gguf_name(name)

    def combined_tensors(self) -> list[CombinedTensor]:
        """The fused gate-then-up projections, each split in two (experts' and the shared MLP's)."""
        combined = super().combined_tensors()
        for name in sorted(self.checkpoint.tensors):
            if not (m := _FUSED_UP.search(name)):
                continue
            bid = int(m["bid"])
            if "shared_mlp" not in name:
                kinds = (_T.FFN_GATE_EXP, _T.FFN_UP_EXP)
                self._check_experts(name, bid)
            elif self.n_expert:
                kinds = (_T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP)
            else:
                kinds = (_T.FFN_GATE, _T.FFN_UP)
            rows = self.checkpoint.tensors[name].shape[-2]
            width = self.ffn_length if "shared_mlp" not in name else int(self._param("shared_intermediate_size"))
            if rows != 2 * width:
                raise ConversionError(
                    f"layer {bid}: tensor {name} has {rows} rows, not gate + up of {width} each as config.json implies"
                )
            combined.extend(
                CombinedTensor(gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", (name,), stack=False,
                               part=part, parts=2)
                for part, kind in enumerate(kinds)
            )
        return combined

    def _check_experts(self, name: str, bid: int) -> None:
        shape = self.checkpoint.tensors[name].shape
        if len(shape) != 3 or shape[0] != self.n_expert:
            raise ConversionError(
                f"layer {bid}: tensor {name} has shape {list(shape)}, not {self.n_expert} experts' matrices "
                f"(config.json's num_local_experts is {self.n_expert})"
            )

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        if self.uses_rope:  # Llama 3 rope factors; a NoPE model has no rope to scale
            yield from super().extra_tensors()
        for name in sorted(self.checkpoint.tensors):
            m = _MIXER.search(name)
            if not m or m["suffix"] not in mamba2.RESHAPED:
                continue
            self.check_shape(name, self.gguf_name(name), self.checkpoint.tensors[name].shape)
            data = self.checkpoint.read(name)
            if data.dtype != np.float16:
                data = data.astype(np.float32)
            yield self.gguf_name(name), mamba2.reshaped_tensor(m["suffix"], data, self.mamba)

    def extra_tensor_source(self, gguf_name: str, data: np.ndarray) -> tuple[str, np.ndarray] | None:
        """A mixer tensor read back from its reshaped (or computed) GGUF form."""
        for name, entry in self.checkpoint.tensors.items():
            m = _MIXER.search(name)
            if m and m["suffix"] in mamba2.RESHAPED and self.gguf_name(name) == gguf_name:
                return name, mamba2.unreshaped_tensor(m["suffix"], data, entry.shape)
        return super().extra_tensor_source(gguf_name, data)

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        kv_heads = keys.need("attention.head_count_kv")
        mamba = [n == 0 for n in kv_heads]
        n_expert = int(keys.get("expert_count") or 0)
        ffn = keys.need("feed_forward_length")
        heads, inner = keys.need("ssm.time_step_rank"), keys.need("ssm.inner_size")
        first_mamba = mamba.index(True) if True in mamba else 0
        return {
            **decoder_config(keys), "model_type": "granitemoehybrid", "architectures": ["GraniteMoeHybridForCausalLM"],
            "layer_types": ["mamba" if m else "attention" for m in mamba],
            "num_key_value_heads": max(kv_heads),
            "position_embedding_type": "rope" if keys.get("rope.scaling.finetuned") else None,
            "rope_parameters": rope_parameters(keys),
            **multipliers_from_gguf(keys),
            "num_local_experts": n_expert, "num_experts_per_tok": keys.get("expert_used_count") or 0,
            "intermediate_size": ffn,
            "shared_intermediate_size": keys.get("expert_shared_feed_forward_length") or ffn,
            "mamba_d_conv": keys.need("ssm.conv_kernel"), "mamba_d_state": keys.need("ssm.state_size"),
            "mamba_n_groups": keys.need("ssm.group_count"), "mamba_n_heads": heads,
            "mamba_d_head": inner // heads, "mamba_expand": inner // keys.need("embedding_length"),
            "mamba_conv_bias": f"blk.{first_mamba}.ssm_conv1d.bias" in keys.shapes, "mamba_proj_bias": False,
        }

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        if m := _MIXER.search(name):
            return self.mamba.shapes().get(m["suffix"])
        hidden = int(self._param("hidden_size"))
        if name.endswith((".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj")):
            return (self.n_expert, hidden, self.ffn_length)
        if name.endswith((".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight")):
            return (self.n_expert, hidden)
        if name.endswith(".shared_mlp.output_linear.weight"):
            return (hidden, int(self._param("shared_intermediate_size")))
        return super().expected_shape(name, gguf_name)

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        required = [gguf.TENSOR_NAMES[_T.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[_T.OUTPUT_NORM] + ".weight"]
        if not self.tied_embeddings:
            required.append(gguf.TENSOR_NAMES[_T.OUTPUT] + ".weight")
        ffn = (_T.FFN_GATE_INP, _T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP) if self.n_expert else (
            _T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN)
        for bid, mamba in enumerate(self.mamba_layers):
            required += mamba2.required(bid) if mamba else [
                gguf.TENSOR_NAMES[k].format(bid=bid) + ".weight" for k in (_T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT)
            ]
            required += [gguf.TENSOR_NAMES[k].format(bid=bid) + ".weight" for k in (_T.ATTN_NORM, _T.FFN_NORM, *ffn)]
        missing = [n for n in required if n not in names]
        if missing:
            raise ConversionError(f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}")


def mamba_layers(hparams: dict, block_count: int) -> list[bool]:
    """Whether each layer is a Mamba-2 layer, from either spelling of `layer_types`.

    Without layer_types: `attn_layer_indices` (older configs), else every layer is Mamba,
    as transformers builds such a config.
    """
    types = hparams.get("layer_types") or hparams.get("layers_block_type")
    if types is None:
        attention = {int(i) for i in hparams.get("attn_layer_indices") or ()}
        return [bid not in attention for bid in range(block_count)]
    if len(types) != block_count:
        raise ConversionError(f"config.json lists {len(types)} layer_types for {block_count} layers")
    unknown = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
    if unknown:
        raise ConversionError(
            f"config.json's layer_types has {unknown[0]!r}; expected one of {', '.join(map(repr, LAYER_TYPES))}"
        )
    return [LAYER_TYPES[t] for t in types]


def _bid(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise ConversionError(f"tensor {name} is not in a numbered layer")
    return int(m["bid"])
