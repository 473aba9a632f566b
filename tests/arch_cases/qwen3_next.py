"""Qwen3-Next: gated DeltaNet layers with fused projections (in_proj_qkvz, in_proj_ba), a gated
full-attention layer, and a mixture of experts with a sigmoid-gated shared expert in every layer.

The layer layout and sizes are Qwen3.5's tiny ones (three linear-attention layers, then one full
attention; two key heads, four value heads). The tokenizer is Qwen3's (Qwen2's regex, as
Qwen3-Next ships) with the Qwen3 chat template (llama.cpp's models/templates/Qwen-Qwen3-0.6B.jinja;
Qwen3-Next's own templates are this family's).
"""

from pathlib import Path

from arch_cases.qwen3_5 import HYBRID, NO_MTP
from convert_helpers import TinyCase, TokenizerInfo, write_bpe_tokenizer


def qwen3_tokenizer(out: Path) -> TokenizerInfo:
    template = Path(__file__).with_name("templates").joinpath("qwen3.jinja").read_text(encoding="utf-8")
    n_vocab = write_bpe_tokenizer(
        out, "qwen2", roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), chat_template=template
    )
    return TokenizerInfo(n_vocab, {"eos_token_id": 2, "pad_token_id": 0})


CASES = [
    TinyCase(
        "qwen3next-hybrid-moe",
        "Qwen3NextForCausalLM",
        qwen3_tokenizer,
        {
            **HYBRID,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": True,
        },
        # With a random LoRA adapter applied (tests/test_export_adapter.py) this tiny model is ill-conditioned
        # in float32: on the 24-token input, transformers' float32 logits lie 1.9e-4 from its own float64
        # ones, llama.cpp's 2.0e-4 from them, on the other side (3.9e-4 apart). Without the adapter: 5.7e-5.
        f32_tolerance=5e-4,
        oracle_args=NO_MTP,
    ),
]
