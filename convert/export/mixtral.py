"""Mixtral (8x7B, 8x22B): llama.cpp's llama architecture with a mixture of experts.

Attention is Llama's (q/k rows permuted for llama.cpp's RoPE layout); each layer's
`block_sparse_moe` experts (w1 = gate, w3 = up, w2 = down) are stacked into
llama.cpp's 3-D expert tensors and its router becomes ffn_gate_inp (see
`MixtureOfExperts`). Experts are as wide as `intermediate_size`, which llama.cpp
reads as the feed-forward length: no separate expert length is written.
"""

import gguf

from convert.export.llama import LlamaModel, llama_config
from convert.export.moe import MixtureOfExperts
from convert.export.registry import register


@register("MixtralForCausalLM")
class MixtralModel(MixtureOfExperts, LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    @classmethod
    def reads_gguf(cls, keys) -> bool:
        return super().reads_gguf(keys) and bool(keys.get("expert_count"))  # a llama file with experts

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**llama_config(keys), "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "num_local_experts": keys.need("expert_count"), "num_experts_per_tok": keys.need("expert_used_count"),
                "sliding_window": None}

