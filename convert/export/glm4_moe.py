"""GLM-4.5, GLM-4.6 and GLM-4.5-Air (`Glm4MoeForCausalLM`): llama.cpp's glm4moe architecture.

GLM-4's attention (q/k/v biases when `attention_bias` is set, optional per-head q/k norms
with `use_qk_norm`, partial rotary: `partial_rotary_factor` of each head rotates, NEOX
pairs as transformers' rotate_half, so no permutation) over a mixture of experts:
- the first `first_k_dense_replace` layers are dense (gate/up/down), the rest are MoE:
  routed experts stacked into llama.cpp's 3-D tensors (see `MixtureOfExperts`), plus
  `n_shared_experts` always-on experts fused into one MLP (ffn_*_shexp);
- routing: sigmoid scores (llama.cpp's expert gating function SIGMOID), the experts chosen
  on score + `e_score_correction_bias` (exp_probs_b), weighted by the plain scores,
  renormalized with `norm_topk_prob` and multiplied by `routed_scaling_factor`;
- expert groups (`n_group`, `topk_group`: the best groups by their two best biased scores,
  then the experts among them) as llama.cpp's expert_group_count and _used_count;
- llama.cpp's glm4moe uses SiLU: another `hidden_act` is refused.

Multi-token prediction (MTP, "nextn"): the hub's checkpoints carry
`num_nextn_predict_layers` extra layers after the last one (embedding + hidden-state
projection eh_proj, its norms, and a full MoE layer). transformers ignores them;
llama.cpp keeps them as extra blocks (blk.N.nextn.*) for its MTP speculative decoding
and skips them in the normal forward pass. We write them as llama.cpp does when the
checkpoint has them. A checkpoint transformers saved (a fine-tune merged by us, say)
has none, yet its config.json still says 1: there we write block_count
num_hidden_layers and nextn_predict_layers 0, where llama.cpp's converter promises an
MTP block the file does not hold.

Tokenizer: GLM's byte-level BPE (llama.cpp's "glm4" split); special tokens as llama.cpp's
converter sets them for GLM-4.5: BOS [gMASK], end of turn <|user|>, end of message
<|observation|> (a tool call's end), UNK <|endoftext|>, and EOS from the files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.glm import _GlmFamily, glm_config
from convert.export.moe import DENSE, ROUTED, MixtureOfExperts
from convert.export.registry import register

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_T = gguf.MODEL_TENSOR
# transformers' defaults for keys a config.json may leave out (Glm4MoeConfig).
_DEFAULTS = {
    "n_shared_experts": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
    "n_group": 1, "topk_group": 1,
}
_SHARED = (_T.FFN_GATE_SHEXP, _T.FFN_UP_SHEXP, _T.FFN_DOWN_SHEXP)
_ATTENTION = (_T.ATTN_NORM, _T.ATTN_POST_NORM, _T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT)
_NEXTN = (_T.NEXTN_EH_PROJ, _T.NEXTN_ENORM, _T.NEXTN_HNORM)


@register("Glm4MoeForCausalLM")
class Glm4MoeModel(MixtureOfExperts, _GlmFamily):
    gguf_arch = gguf.MODEL_ARCH.GLM4_MOE
    special_tokens = {
        "bos": "[gMASK]",
        "eos": "<|endoftext|>",  # only where the tokenizer files name none
        "eot": "<|user|>",
        "unk": "<|endoftext|>",
        "eom": "<|observation|>",
    }

    def __init__(self, checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        self.n_trunk = self.block_count
        self.n_nextn = self._nextn_layers()
        if self.n_nextn:  # the MTP blocks come after the trunk, as llama.cpp numbers them
            self.block_count += self.n_nextn
            self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        self._check_routing()

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        """The trunk's config: transformers neither loads nor saves the MTP layers, which a hub
        file holds after the trunk's (left out, as `left_out_of_checkpoint` says)."""
        config = glm_config(keys, "glm4_moe", "Glm4MoeForCausalLM")
        nextn = int(keys.get("nextn_predict_layers") or 0)
        return {
            **config, "num_hidden_layers": config["num_hidden_layers"] - nextn, "num_nextn_predict_layers": nextn,
            "use_qk_norm": "blk.0.attn_q_norm.weight" in keys.shapes,
            "first_k_dense_replace": keys.need("leading_dense_block_count"),
            "moe_intermediate_size": keys.need("expert_feed_forward_length"),
            "n_routed_experts": keys.need("expert_count"), "num_experts_per_tok": keys.need("expert_used_count"),
            "n_shared_experts": keys.need("expert_shared_count"),
            "n_group": keys.get("expert_group_count", 1), "topk_group": keys.get("expert_group_used_count", 1),
            "routed_scaling_factor": keys.get("expert_weights_scale", 1.0),
            "norm_topk_prob": bool(keys.get("expert_weights_norm", False)),
        }

    @classmethod
    def left_out_of_checkpoint(cls, keys, gguf_name: str) -> bool:
        trunk = int(keys.need("block_count")) - int(keys.get("nextn_predict_layers") or 0)
        parts = gguf_name.split(".")
        return parts[0] == "blk" and int(parts[1]) >= trunk

    def _hp(self, key: str):
        value = self.hparams.get(key)
        return _DEFAULTS[key] if value is None else value

    def _nextn_layers(self) -> int:
        """How many MTP layers the checkpoint holds: config.json's count, or 0 if it holds none."""
        configured = int(self.hparams.get("num_nextn_predict_layers") or 0)
        present = {int(m[1]) for name in self.checkpoint.tensors if (m := _LAYER.match(name))}
        extra = sorted(bid for bid in present if bid >= self.n_trunk)
        if not extra:
            return 0
        if extra != list(range(self.n_trunk, self.n_trunk + configured)):
            raise ConversionError(
                f"the checkpoint has layers {extra[0]}..{extra[-1]} after its {self.n_trunk} layers "
                f"(num_hidden_layers), but config.json's num_nextn_predict_layers is {configured}"
            )
        return configured

    def _check_routing(self) -> None:
        """Refuse what llama.cpp's glm4moe computes differently from transformers."""
        act = self.hparams.get("hidden_act") or "silu"
        if act != "silu":
            raise ConversionError(f"hidden_act {act!r} cannot be represented: llama.cpp's glm4moe uses SiLU")
        groups, n_expert = int(self._hp("n_group")), self.expert_count[1]
        if groups > 1 and (n_expert % groups or n_expert // groups < 2 or int(self._hp("topk_group")) > groups):
            raise ConversionError(
                f"n_group {groups} / topk_group {self._hp('topk_group')} do not fit {n_expert} experts: "
                "each group needs at least 2 of them, all groups the same number"
            )

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_rope_dimension_count(self.rope_dims)
        writer.add_expert_feed_forward_length(int(self._param("moe_intermediate_size")))
        writer.add_expert_shared_count(int(self._hp("n_shared_experts")))
        writer.add_leading_dense_block_count(int(self._hp("first_k_dense_replace")))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_expert_group_count(int(self._hp("n_group")))
        writer.add_expert_group_used_count(int(self._hp("topk_group")))
        writer.add_expert_weights_scale(float(self._hp("routed_scaling_factor")))
        writer.add_expert_weights_norm(bool(self._hp("norm_topk_prob")))
        writer.add_nextn_predict_layers(self.n_nextn)

    def gguf_name(self, name: str) -> str:
        # transformers' router bias is a buffer named `e_score_correction_bias`; the tensor map
        # knows it as `e_score_correction` with a `.bias` suffix (llama.cpp's exp_probs_b.bias).
        if name.endswith(".e_score_correction_bias"):
            name = name[: -len("_bias")] + ".bias"
        return super().gguf_name(name)

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        kind = _kind(gguf_name)
        hidden = int(self._param("hidden_size"))
        if kind in _SHARED:
            width = int(self._param("moe_intermediate_size")) * int(self._hp("n_shared_experts"))
            return (hidden, width) if kind is _T.FFN_DOWN_SHEXP else (width, hidden)
        if kind is _T.FFN_EXP_PROBS_B:
            return (self.expert_count[1],)
        if kind is _T.NEXTN_EH_PROJ:
            return (hidden, 2 * hidden)
        return super().expected_shape(name, gguf_name)

    @property
    def leading_dense_layers(self) -> tuple[int, str]:
        return int(self._hp("first_k_dense_replace")), "first_k_dense_replace"

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        """The MoE base's check (dense layers first, then mixtures), then GLM's own: attention with its
        post-norm, the shared experts, the router bias, the MTP layers, no dense tensor in a MoE layer."""
        names = set(gguf_names)
        super().check_tensors(names)
        dense_layers = int(self._hp("first_k_dense_replace"))
        n_shared = int(self._hp("n_shared_experts"))
        for bid in range(self.block_count):
            moe = bid >= dense_layers
            wanted = [*_ATTENTION, *(_SHARED if moe and n_shared else ())]
            if bid >= self.n_trunk:
                wanted.extend(_NEXTN)
            required = [_name(kind, bid) for kind in wanted]
            if moe:
                required.append(_name(_T.FFN_EXP_PROBS_B, bid, "bias"))
            missing = [n for n in required if n not in names]
            if missing:
                raise ConversionError(
                    f"layer {bid} is incomplete: {missing[0]} is missing (first_k_dense_replace {dense_layers} "
                    f"makes it {'a mixture of experts' if moe else 'dense'}, n_shared_experts {n_shared})"
                )
            stray = [_name(k, bid) for k in (DENSE if moe else ROUTED) if _name(k, bid) in names]
            if stray:
                raise ConversionError(
                    f"layer {bid} has {stray[0]}, but first_k_dense_replace {dense_layers} makes it "
                    f"{'a mixture of experts' if moe else 'dense'}: the config and the weights disagree"
                )


def _name(kind: gguf.MODEL_TENSOR, bid: int, suffix: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def _kind(gguf_name: str) -> gguf.MODEL_TENSOR | None:
    """The tensor kind of a block tensor's GGUF name (blk.N.KIND.weight)."""
    parts = gguf_name.split(".")
    if len(parts) < 4 or parts[0] != "blk":
        return None
    base = ".".join(["blk", "{bid}", *parts[2:-1]])
    return _KINDS.get(base)


_KINDS = {gguf.TENSOR_NAMES[k]: k for k in (*_SHARED, _T.FFN_EXP_PROBS_B, _T.NEXTN_EH_PROJ)}
