"""Llama 2 (SentencePiece, GQA) and Llama 3.2 (BPE, tied embeddings, llama3 rope scaling)."""

from convert_helpers import TinyCase

CASES = [
    TinyCase("llama-spm-gqa", "LlamaForCausalLM", "spm"),
    TinyCase(
        # Llama 3.2 1B/3B: tied embeddings and llama3 rope scaling together.
        "llama3-bpe-tied",
        "LlamaForCausalLM",
        "llama-bpe",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        },
    ),
]
