"""OLMo 2: norms after the attention and the MLP, and q/k norms over whole projections.

Each block normalizes the output of its attention (`post_attention_layernorm`)
and of its MLP (`post_feedforward_layernorm`) before adding it to the residual
stream; there is no norm on the way in. The q and k norms are RMSNorms over the
whole projection (all heads at once), not per head. gguf's tensor map names
them `post_attention_norm`, `post_ffw_norm`, `attn_q_norm` and `attn_k_norm`.

llama.cpp runs OLMo 2 with the half-split rotary layout of Hugging Face: no q/k
permutation. It needs its own output matrix (OLMo 2 never ties it).

OLMo 2's tokenizer is cl100k's (the Llama 3 split); llama.cpp names it "dbrx",
which unlike "llama-bpe" keeps applying merges to words that are whole tokens,
as the tokenizer.json does.
"""

from __future__ import annotations

import gguf

from typing import Any

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.checkpoint import Checkpoint
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register


@register("Olmo2ForCausalLM")
class Olmo2Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.OLMO2
    pre_tokenizer_names = {"llama-bpe": "dbrx"}

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        if self.tied_embeddings:
            raise ConversionError(
                "this OLMo 2 checkpoint ties its output projection to the embeddings; "
                "llama.cpp's olmo2 architecture needs a separate output matrix"
            )

    @classmethod
    def reads_gguf(cls, keys) -> bool:
        return keys.arch == "olmo2" and not keys.has("attention.sliding_window")

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        return {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], **decoder_config(keys),
                "rope_parameters": rope_parameters(keys)}

