"""Qwen3-Next (Qwen3-Next-80B-A3B): llama.cpp's qwen3next architecture.

Gated DeltaNet layers between gated full-attention layers (see gated_deltanet.py), a
mixture of experts with one sigmoid-gated shared expert in every layer (as Qwen3.5 MoE),
and what is its own, as llama.cpp's converter writes it:
- the linear attention's projections are fused per key head: `in_proj_qkvz` holds, for each
  key head, its query, key, values and output gates (z); it becomes attn_qkv (all queries,
  then all keys, then all values) and attn_gate (all gates). `in_proj_ba` (beta and alpha)
  is kept whole as ssm_ba. Value heads stay grouped by key head (no reordering);
- plain RoPE on `partial_rotary_factor` of each head (no multimodal sections).
llama.cpp's qwen3next has a mixture in every layer: a config with dense layers
(`mlp_only_layers`, `decoder_sparse_step` > 1) is refused.
"""

import logging
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import CombinedTensor
from convert.export.checkpoint import Checkpoint
from convert.export.gated_deltanet import FULL, LINEAR, GatedDeltaNetHybrid, RewrittenTensor
from convert.export.moe import MixtureOfExperts
from convert.export.qwen3_5 import write_shared_expert_sizes
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

log = logging.getLogger(__name__)


@register("Qwen3NextForCausalLM")
class Qwen3NextModel(MixtureOfExperts, GatedDeltaNetHybrid):
    gguf_arch = gguf.MODEL_ARCH.QWEN3NEXT

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        dense = self.hparams.get("mlp_only_layers") or []
        step = int(self.hparams.get("decoder_sparse_step") or 1)
        if dense or step != 1:
            raise ConversionError(
                f"this Qwen3-Next has dense feed-forward layers (mlp_only_layers {dense}, decoder_sparse_step "
                f"{step}), but llama.cpp's qwen3next has a mixture of experts in every layer"
            )

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        config = decoder_config(keys)
        n_v = keys.need("ssm.time_step_rank")
        rope = rope_parameters(keys)
        rope["partial_rotary_factor"] = keys.need("rope.dimension_count") / config["head_dim"]
        return {
            **config, "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "rope_parameters": rope,
            "layer_types": [LINEAR if recurrent else FULL for recurrent in keys.need("attention.recurrent_layers")],
            "full_attention_interval": keys.get("full_attention_interval", 4),
            "linear_num_key_heads": keys.need("ssm.group_count"), "linear_num_value_heads": n_v,
            "linear_key_head_dim": keys.need("ssm.state_size"),
            "linear_value_head_dim": keys.need("ssm.inner_size") // n_v,
            "linear_conv_kernel_dim": keys.need("ssm.conv_kernel"),
            "num_experts": keys.need("expert_count"), "num_experts_per_tok": keys.need("expert_used_count"),
            "moe_intermediate_size": keys.need("expert_feed_forward_length"),
            "shared_expert_intermediate_size": keys.need("expert_shared_feed_forward_length"),
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
        }

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        write_shared_expert_sizes(self, writer)
        if not self.hparams.get("norm_topk_prob", True):
            log.warning("norm_topk_prob is false, but llama.cpp renormalizes the chosen experts' weights")

    def combined_tensors(self) -> list[CombinedTensor]:
        combined = super().combined_tensors()
        for name in sorted(self.checkpoint.tensors):
            if name.endswith(".linear_attn.in_proj_qkvz.weight"):
                combined += self._split_qkvz(name)
        return combined

    def _split_qkvz(self, name: str) -> list[RewrittenTensor]:
        """in_proj_qkvz's rows, [key head: q, k, v..., z...] each, as attn_qkv and attn_gate."""
        shape = self.checkpoint.tensors[name].shape
        self.check_shape(name, "", shape)
        bid = int(name.split(".layers.")[1].split(".")[0])
        d_k, per_head_v = self.d_k, self.n_v // self.n_k * self.d_v
        bounds = np.cumsum([0, d_k, d_k, per_head_v, per_head_v])

        def part(data: np.ndarray, which: int) -> np.ndarray:
            heads = data.reshape(self.n_k, int(bounds[-1]), *data.shape[1:])
            return heads[:, bounds[which] : bounds[which + 1]].reshape(-1, *data.shape[1:])

        def qkv(data: np.ndarray) -> np.ndarray:
            return np.concatenate([part(data, 0), part(data, 1), part(data, 2)])

        def gate(data: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(part(data, 3))

        value_dim = self.n_v * self.d_v
        kinds = ((gguf.MODEL_TENSOR.ATTN_QKV, qkv, 2 * self.n_k * d_k + value_dim), (gguf.MODEL_TENSOR.ATTN_GATE, gate, value_dim))
        return [
            RewrittenTensor(gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight", (name,), stack=False, rows=rows,
                            out_shape=(n_rows, shape[1]))
            for kind, rows, n_rows in kinds
        ]
