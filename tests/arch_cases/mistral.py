"""Mistral: the Llama architecture with a SentencePiece tokenizer, here with linear rope scaling."""

from convert_helpers import TinyCase

CASES = [
    TinyCase(
        "mistral-spm-linear-rope",
        "MistralForCausalLM",
        "spm",
        {"sliding_window": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    ),
]
