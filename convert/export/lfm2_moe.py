"""LFM2 MoE (LFM2-8B-A1B): LFM2's convolution and attention layers with mixtures of experts, as llama.cpp's lfm2moe.

Everything LFM2 (convert/export/lfm2.py) has, except the feed-forward blocks:
- the first `num_dense_layers` are dense SwiGLUs of `intermediate_size` (used as is: no 2/3
  adjustment here) and llama.cpp's `leading_dense_block_count`;
- every later one is a mixture of `num_experts` experts of `moe_intermediate_size`, stacked into
  llama.cpp's 3-D tensors (ffn_gate_exps/ffn_up_exps/ffn_down_exps from each expert's w1/w3/w2),
  routed by `feed_forward.gate` (ffn_gate_inp) with sigmoid scores; `expert_bias` shifts the
  scores only to choose the experts (llama.cpp's exp_probs_b). A checkpoint without it
  (`use_expert_bias: false`) gets zeros, which choose the same experts.
llama.cpp always renormalizes the chosen experts' weights to sum to 1 and does not scale them:
`norm_topk_prob: false` or a `routed_scaling_factor` other than 1 is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import CombinedTensor
from convert.export.checkpoint import Checkpoint
from convert.export.lfm2 import ATTENTION, CONV, Lfm2Model, tensor_name
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

_T = gguf.MODEL_TENSOR
# An expert's projection in the checkpoint -> llama.cpp's stacked tensor of the layer's experts.
_EXPERT_TENSORS = {"w1": _T.FFN_GATE_EXP, "w3": _T.FFN_UP_EXP, "w2": _T.FFN_DOWN_EXP}
_FFN = r"(?:^|\.)layers\.(?P<bid>\d+)\.feed_forward"
_ONE_EXPERT = re.compile(_FFN + r"\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])\.weight$")
_EXPERT_BIAS = re.compile(_FFN + r"\.expert_bias$")


@register("Lfm2MoeForCausalLM")
class Lfm2MoeModel(Lfm2Model):
    gguf_arch = gguf.MODEL_ARCH.LFM2MOE

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        hp = self.hparams
        self.n_expert = int(self._param("num_experts", "num_local_experts"))
        self.n_expert_used = int(self._param("num_experts_per_tok"))
        self.expert_width = int(self._param("moe_intermediate_size"))
        self.n_dense = int(hp.get("num_dense_layers", 2))  # transformers' default
        if not 0 < self.n_expert_used <= self.n_expert:
            raise ConversionError(
                f"config.json's num_experts_per_tok is {self.n_expert_used}, for {self.n_expert} experts"
            )
        if not 0 <= self.n_dense <= self.block_count:
            raise ConversionError(f"config.json's num_dense_layers is {self.n_dense}, for {self.block_count} layers")
        if not hp.get("norm_topk_prob", True):
            raise ConversionError(
                "config.json's norm_topk_prob is false, but llama.cpp's lfm2moe always renormalizes the chosen "
                "experts' weights"
            )
        if float(hp.get("routed_scaling_factor") or 1.0) != 1.0:
            raise ConversionError(
                f"config.json's routed_scaling_factor is {hp['routed_scaling_factor']}, but llama.cpp's lfm2moe "
                "does not scale the experts' weights"
            )

    def dense_ffn_width(self) -> int:
        return int(self._param("intermediate_size"))

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        kv_heads = keys.need("attention.head_count_kv")
        config = decoder_config(keys)
        return {
            **config, "model_type": "lfm2_moe", "architectures": ["Lfm2MoeForCausalLM"],
            "layer_types": [ATTENTION if n else CONV for n in kv_heads], "num_key_value_heads": max(kv_heads),
            "norm_eps": config["rms_norm_eps"], "rope_parameters": rope_parameters(keys),
            "conv_L_cache": keys.need("shortconv.l_cache"), "conv_bias": False,
            "num_experts": keys.need("expert_count"), "num_experts_per_tok": keys.need("expert_used_count"),
            "moe_intermediate_size": keys.need("expert_feed_forward_length"),
            "num_dense_layers": keys.need("leading_dense_block_count"),
            "use_expert_bias": True, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        }

    def moe_layers(self) -> range:
        return range(self.n_dense, self.block_count)

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_expert_count(self.n_expert)
        writer.add_expert_used_count(self.n_expert_used)
        writer.add_expert_feed_forward_length(self.expert_width)
        writer.add_leading_dense_block_count(self.n_dense)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

    # -- tensors -------------------------------------------------------------------

    def gguf_name(self, name: str) -> str:
        # The expert bias is stored without a suffix; llama.cpp reads it as a bias.
        if m := _EXPERT_BIAS.search(name):
            return tensor_name(_T.FFN_EXP_PROBS_B, int(m["bid"]), ".bias")
        return super().gguf_name(name)

    def combined_tensors(self) -> list[CombinedTensor]:
        combined = super().combined_tensors()
        experts: dict[tuple[int, str], dict[int, str]] = {}
        for name in self.checkpoint.tensors:
            if m := _ONE_EXPERT.search(name):
                experts.setdefault((int(m["bid"]), m["proj"]), {})[int(m["expert"])] = name
        for (bid, proj), names in sorted(experts.items()):
            if bid not in self.moe_layers():
                raise ConversionError(
                    f"layer {bid} has experts ({names[min(names)]}), but config.json's num_dense_layers "
                    f"({self.n_dense}) makes it a dense layer"
                )
            missing = [x for x in range(self.n_expert) if x not in names]
            if missing or len(names) != self.n_expert:
                raise ConversionError(
                    f"layer {bid}: {len(names)} experts' {proj} in the checkpoint, but config.json's num_experts "
                    f"is {self.n_expert}"
                )
            sources = tuple(names[x] for x in range(self.n_expert))
            for source in sources:  # stacked tensors are not checked one by one by the exporter
                self.check_shape(source, "", self.checkpoint.tensors[source].shape)
            combined.append(CombinedTensor(tensor_name(_EXPERT_TENSORS[proj], bid), sources))
        return combined

    @property
    def uses_expert_bias(self) -> bool:
        return bool(self.hparams.get("use_expert_bias", True))

    def skip_tensor(self, name: str) -> bool:
        # Without use_expert_bias transformers ignores a stored bias: zeros take its place below.
        return super().skip_tensor(name) or (not self.uses_expert_bias and bool(_EXPERT_BIAS.search(name)))

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        if self.uses_expert_bias:
            return
        for bid in self.moe_layers():  # zeros choose the experts by their scores alone, as transformers then does
            yield tensor_name(_T.FFN_EXP_PROBS_B, bid, ".bias"), np.zeros(self.n_expert, dtype=np.float32)

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        if name.endswith(".feed_forward.gate.weight"):
            return (self.n_expert, self.n_embd)
        if _EXPERT_BIAS.search(name):
            return (self.n_expert,)
        if m := _ONE_EXPERT.search(name):
            return (self.n_embd, self.expert_width) if m["proj"] == "w2" else (self.expert_width, self.n_embd)
        return super().expected_shape(name, gguf_name)

    def ffn_tensors(self, bid: int) -> list[str]:
        if bid not in self.moe_layers():
            return super().ffn_tensors(bid)
        kinds = (_T.FFN_GATE_INP, _T.FFN_GATE_EXP, _T.FFN_UP_EXP, _T.FFN_DOWN_EXP)
        return [tensor_name(kind, bid) for kind in kinds] + [tensor_name(_T.FFN_EXP_PROBS_B, bid, ".bias")]
