"""Qwen3.5, dense and MoE (and the text tower of its image-text models): llama.cpp's qwen35 and qwen35moe.

Gated DeltaNet layers between gated full-attention layers (see gated_deltanet.py), with
what Qwen3.5 adds, as llama.cpp's converter writes it:
- the linear attention has separate projections (in_proj_qkv, in_proj_z, in_proj_b,
  in_proj_a); where there are more value heads than key heads (every released size), the
  value heads are reordered from grouped-by-key-head to tiled order in every tensor that
  holds them (the V rows of in_proj_qkv and of the convolution, in_proj_z, in_proj_a/b,
  A_log, dt_bias, and out_proj's input columns), so that llama.cpp can broadcast key heads;
- RoPE is interleaved multimodal RoPE (llama.cpp's IMROPE): its sections
  (`mrope_section`) are written, llama.cpp requires them, [11, 11, 10] when the config has
  none (transformers' default). A text token has the same position in every section, so
  the sections change nothing for text;
- `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration`: only the
  language model (`model.language_model.*`, settings from `text_config`); the vision tower
  goes to llama.cpp's separate mmproj file, which we do not write;
- the MoE: a router over `num_experts` experts (`num_experts_per_tok` used), each
  `moe_intermediate_size` wide, stacked as llama.cpp's 3-D tensors (moe.py), plus one
  shared expert (`shared_expert_intermediate_size`) whose output a sigmoid gate scales
  (`shared_expert_gate`: ffn_gate_inp_shexp).
"""

import gguf

from convert.export.gated_deltanet import GatedDeltaNetHybrid
from convert.export.moe import MixtureOfExperts
from convert.export.registry import register

# transformers' Qwen3.5 rotary embedding falls back to these sections (head_dim 256 × 0.25 = 64 dims).
_DEFAULT_MROPE_SECTIONS = [11, 11, 10, 0]


class _Qwen35(GatedDeltaNetHybrid):
    tiled_value_heads = True

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        if self.rope.get("mrope_section") is None:
            writer.add_rope_dimension_sections(_DEFAULT_MROPE_SECTIONS)

    def extra_rope_types(self) -> tuple[str, ...]:
        return ("mrope",)  # the multimodal RoPE some configs name, written by its sections


@register("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
class Qwen35Model(_Qwen35):
    gguf_arch = gguf.MODEL_ARCH.QWEN35


@register("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
class Qwen35MoeModel(MixtureOfExperts, _Qwen35):
    gguf_arch = gguf.MODEL_ARCH.QWEN35MOE

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        write_shared_expert_sizes(self, writer)


def write_shared_expert_sizes(model: GatedDeltaNetHybrid, writer: gguf.GGUFWriter) -> None:
    """Each routed expert's width and the shared expert's, as llama.cpp's converter writes them."""
    if model.hparams.get("moe_intermediate_size") is not None:
        writer.add_expert_feed_forward_length(int(model.hparams["moe_intermediate_size"]))
    if model.hparams.get("shared_expert_intermediate_size") is not None:
        writer.add_expert_shared_feed_forward_length(int(model.hparams["shared_expert_intermediate_size"]))
