"""Mistral: the Llama architecture in llama.cpp (same tensors, same q/k permutation).

Mistral 7B v0.1's sliding-window attention (4096 tokens) is not part of
llama.cpp's llama architecture; like llama.cpp's own converter we export the
full-attention model, which is identical for contexts up to the window.
"""

import logging

import gguf

from convert.export.llama import LlamaModel
from convert.export.registry import register

log = logging.getLogger(__name__)


@register("MistralForCausalLM")
class MistralModel(LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        window = self.hparams.get("sliding_window")
        if window and window < self.hparams.get("max_position_embeddings", 0):
            log.warning("sliding window of %d tokens is not kept: llama.cpp attends to the whole context", window)
