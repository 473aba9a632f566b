"""Qwen3 MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): llama.cpp's qwen3moe architecture.

Qwen3's attention (per-head q/k norms, explicit head_dim) with a mixture of experts
in every layer: the experts are stacked into llama.cpp's 3-D tensors (see
`MixtureOfExperts`), the router is ffn_gate_inp, and each expert's width
(`moe_intermediate_size`) is the expert feed-forward length.

llama.cpp always renormalizes the chosen experts' weights to sum to 1, as
`norm_topk_prob: true` does (every released Qwen3 MoE); a checkpoint without it
still converts, as with llama.cpp's converter, but with a warning.
"""

import logging
from collections.abc import Iterable

import gguf

from convert.export.moe import MixtureOfExperts
from convert.export.qwen3 import check_qwen3_attention, qwen3_config
from convert.export.registry import register

log = logging.getLogger(__name__)


@register("Qwen3MoeForCausalLM")
class Qwen3MoeModel(MixtureOfExperts):
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {
            **qwen3_config(keys, "qwen3_moe", "Qwen3MoeForCausalLM"),
            "num_experts": keys.need("expert_count"), "num_experts_per_tok": keys.need("expert_used_count"),
            "moe_intermediate_size": keys.need("expert_feed_forward_length"), "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        }

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        if self.hparams.get("moe_intermediate_size") is not None:
            writer.add_expert_feed_forward_length(int(self.hparams["moe_intermediate_size"]))
        if not self.hparams.get("norm_topk_prob", False):
            log.warning("norm_topk_prob is false, but llama.cpp renormalizes the chosen experts' weights")

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        super().check_tensors(names)
        check_qwen3_attention(self, names)
