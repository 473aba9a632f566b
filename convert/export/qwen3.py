"""Qwen3: llama.cpp's qwen3 architecture.

What differs from Qwen2:
- each attention head's q and k are RMS-normalized before RoPE (`q_norm`/`k_norm`,
  one weight per head dimension: attn_q_norm/attn_k_norm);
- `head_dim` is explicit and need not be hidden_size / heads (it becomes the GGUF's
  key and value lengths);
- no q/k/v biases unless `attention_bias` is set, and then o_proj has one too, which
  llama.cpp's qwen3 has no place for: such a checkpoint is refused.
Small sizes tie the output projection to the embeddings; RoPE uses Hugging Face's
half-split layout, as llama.cpp's qwen3 does (no permutation).
"""

from collections.abc import Iterable

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register


@register("Qwen3ForCausalLM")
class Qwen3Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.QWEN3

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        """(transformers' GGUF reader takes head_dim as hidden_size / heads: wrong for Qwen3 0.6B and 4B.)"""
        return qwen3_config(keys, "qwen3", "Qwen3ForCausalLM")

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        super().check_tensors(names)
        check_qwen3_attention(self, names)


def qwen3_config(keys, model_type: str, architecture: str) -> dict:
    return {**decoder_config(keys), "model_type": model_type, "architectures": [architecture],
            "rope_parameters": rope_parameters(keys), "attention_bias": False}


def check_qwen3_attention(model: ArchModel, names: set[str]) -> None:
    """Every layer has its q/k norms, and no attention output bias (llama.cpp would not load it)."""
    for bid in range(model.block_count):
        for kind in (gguf.MODEL_TENSOR.ATTN_Q_NORM, gguf.MODEL_TENSOR.ATTN_K_NORM):
            name = gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"
            if name not in names:
                raise ConversionError(f"the checkpoint is incomplete: {name} (the per-head q/k norm) is missing")
        bias = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_OUT].format(bid=bid) + ".bias"
        if bias in names:
            raise ConversionError(
                f"layer {bid} has an attention output bias (attention_bias: true), which llama.cpp's "
                f"{model.arch_name} cannot run"
            )
