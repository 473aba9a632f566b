"""Qwen2 / Qwen2.5: llama.cpp's qwen2 architecture.

Unlike Llama, q/k/v projections have biases (kept in F32) and rotary
embeddings use the same half-split layout as Hugging Face: no permutation.
Small Qwen2 models tie the output projection to the embeddings.

A qwen2 GGUF base with Qwen's byte-level BPE is read back by our exporter run backwards
(convert/gguf_read_back.py); one with a SentencePiece vocabulary is left to transformers' reader.
"""

import gguf

from convert.export.base import ArchModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register


@register("Qwen2ForCausalLM")
class Qwen2Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    @classmethod
    def reads_gguf(cls, keys) -> bool:
        return keys.arch == "qwen2" and keys.raw("tokenizer.ggml.model") == "gpt2"

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**decoder_config(keys), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                "rope_parameters": rope_parameters(keys), "use_sliding_window": False}
