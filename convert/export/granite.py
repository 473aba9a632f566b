"""Granite 3.x: Llama's tensors and q/k permutation, with four scalars of its own.

transformers' Granite multiplies the embeddings by `embedding_multiplier`,
each block's output by `residual_multiplier` before it joins the residual
stream, uses `attention_multiplier` as the attention scale (instead of
1/sqrt(head size)), and divides the logits by `logits_scaling`. llama.cpp's
granite architecture reads them as `granite.embedding_scale`,
`residual_scale`, `attention.scale` and `logit_scale`. A config.json that
leaves one out gets transformers' default (1.0), which is what transformers
runs; llama.cpp's converter writes nothing then, and llama.cpp would fall back
to 1/sqrt(head size) for the attention scale.

llama.cpp's granite derives the head size from hidden_size / num_attention_heads:
a `head_dim` that agrees is dropped (as llama.cpp's converter does), one that
does not is refused.

Granite 3's tokenizer splits text as StarCoder's does (single digits, then the
GPT-2 regex); llama.cpp names it "refact".
"""

from __future__ import annotations

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.llama import LlamaModel
from convert.export.registry import register

# config.json key -> llama.cpp's key (as GGUFWriter's add_embedding_scale... write them); transformers'
# default is 1.0 for each.
MULTIPLIERS: dict[str, str] = {
    "embedding_multiplier": gguf.Keys.LLM.EMBEDDING_SCALE,
    "residual_multiplier": gguf.Keys.LLM.RESIDUAL_SCALE,
    "attention_multiplier": gguf.Keys.Attention.SCALE,
    "logits_scaling": gguf.Keys.LLM.LOGIT_SCALE,
}


def write_multipliers(hparams: dict, writer: gguf.GGUFWriter) -> None:
    """Each multiplier, transformers' 1.0 where config.json leaves it out (Granite 3 and 4)."""
    for key, gguf_key in MULTIPLIERS.items():
        value = hparams.get(key)
        writer.add_float32(gguf_key.format(arch=writer.arch), float(1.0 if value is None else value))


def multipliers_from_gguf(keys) -> dict[str, float]:
    """config.json's multipliers from a file's keys (1.0 for one it leaves out, as llama.cpp takes it)."""
    return {key: keys.raw(gguf_key.format(arch=keys.arch), 1.0) for key, gguf_key in MULTIPLIERS.items()}


@register("GraniteForCausalLM")
class GraniteModel(LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.GRANITE
    pre_tokenizer_names = {"smollm": "refact"}

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        head_dim = self.hparams.get("head_dim")
        if head_dim is not None:
            derived = int(self._param("hidden_size")) // self.n_head
            if int(head_dim) != derived:
                raise ConversionError(
                    f"config.json's head_dim is {head_dim}, but llama.cpp's granite architecture always "
                    f"uses hidden_size / num_attention_heads = {derived}"
                )
            self.hparams = {key: value for key, value in self.hparams.items() if key != "head_dim"}

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**decoder_config(keys), "model_type": "granite", "architectures": ["GraniteForCausalLM"],
                "rope_parameters": rope_parameters(keys), "attention_bias": "blk.0.attn_q.bias" in keys.shapes,
                **multipliers_from_gguf(keys)}

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        write_multipliers(self.hparams, writer)
