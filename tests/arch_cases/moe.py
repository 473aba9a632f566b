"""Mixtures of experts: Qwen3 MoE (qwen3moe) and Mixtral (llama with experts), 4 experts, 2 used.

Both are saved as transformers 5 writes them: one matrix per expert, stacked by the exporter.
"""

from convert_helpers import TinyCase

CASES = [
    TinyCase(
        "qwen3moe-bpe",
        "Qwen3MoeForCausalLM",
        "qwen2",
        # norm_topk_prob as every released Qwen3 MoE has it (llama.cpp always renormalizes).
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
    ),
    TinyCase("mixtral-spm", "MixtralForCausalLM", "spm", {"num_local_experts": 4, "num_experts_per_tok": 2}),
]
