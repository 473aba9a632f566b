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

from collections.abc import Callable

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.llama import LlamaModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

# config.json key -> the GGUFWriter method that writes llama.cpp's key; transformers' default is 1.0 for each.
MULTIPLIERS: dict[str, Callable[[gguf.GGUFWriter, float], None]] = {
    "embedding_multiplier": gguf.GGUFWriter.add_embedding_scale,
    "residual_multiplier": gguf.GGUFWriter.add_residual_scale,
    "attention_multiplier": gguf.GGUFWriter.add_attention_scale,
    "logits_scaling": gguf.GGUFWriter.add_logit_scale,
}

# config.json's multipliers -> their GGUF keys, as MULTIPLIERS writes them.
MULTIPLIER_KEYS = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
                   "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}


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
    def reads_gguf(cls, keys) -> bool:
        return keys.arch == "granite"

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**decoder_config(keys), "model_type": "granite", "architectures": ["GraniteForCausalLM"],
                "rope_parameters": rope_parameters(keys), "attention_bias": "blk.0.attn_q.bias" in keys.shapes,
                **{key: keys.get(gguf_key, 1.0) for key, gguf_key in MULTIPLIER_KEYS.items()}}

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        for key, add in MULTIPLIERS.items():
            value = self.hparams.get(key)
            add(writer, float(1.0 if value is None else value))
