"""Qwen2 / Qwen2.5: q/k/v biases, tied embeddings on small sizes."""

from convert_helpers import TinyCase

CASES = [
    TinyCase("qwen2-bpe-tied", "Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    TinyCase("qwen2-spm", "Qwen2ForCausalLM", "spm"),
]
