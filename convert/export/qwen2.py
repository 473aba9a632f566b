"""Qwen2 / Qwen2.5: llama.cpp's qwen2 architecture.

Unlike Llama, q/k/v projections have biases (kept in F32) and rotary
embeddings use the same half-split layout as Hugging Face: no permutation.
Small Qwen2 models tie the output projection to the embeddings.
"""

import gguf

from convert.export.base import ArchModel
from convert.export.registry import register


@register("Qwen2ForCausalLM")
class Qwen2Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
