"""SmolLM3: Llama's tensors, with no rotary embedding in every fourth layer (NoPE).

llama.cpp's smollm3 architecture has no GGUF key for the layers without RoPE:
it skips RoPE in layers 4, 8, 12... (`(il + 1) % 4 == 0`), transformers'
default for SmolLM3 (`no_rope_layer_interval` 4). Like llama.cpp's converter
we write nothing for it, and we refuse a checkpoint whose `no_rope_layers`
follow another pattern: llama.cpp would run a different model. q and k are
permuted as for Llama.
"""

from __future__ import annotations

import logging

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.llama import LlamaModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

log = logging.getLogger(__name__)

# llama.cpp: `hparams.n_no_rope_layer_step = 4` for smollm3, not read from the file.
LLAMA_CPP_NO_ROPE_INTERVAL = 4


@register("SmolLM3ForCausalLM")
class SmolLM3Model(LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.SMOLLM3

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        uses_rope = rope_layers(self.hparams, self.block_count)
        expected = [(il + 1) % LLAMA_CPP_NO_ROPE_INTERVAL != 0 for il in range(self.block_count)]
        if uses_rope != expected:
            differ = next(il for il in range(self.block_count) if uses_rope[il] != expected[il])
            raise ConversionError(
                f"layer {differ} {'uses' if uses_rope[differ] else 'skips'} RoPE in this checkpoint "
                f"(no_rope_layers), but llama.cpp's smollm3 skips RoPE in every "
                f"{LLAMA_CPP_NO_ROPE_INTERVAL}th layer and nowhere else: it would run a different model"
            )

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**decoder_config(keys), "model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"],
                "rope_parameters": rope_parameters(keys), "no_rope_layer_interval": LLAMA_CPP_NO_ROPE_INTERVAL,
                "use_sliding_window": False}

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        window = self.hparams.get("sliding_window")
        if self.hparams.get("use_sliding_window") and window:
            log.warning("sliding window of %d tokens is not kept: llama.cpp attends to the whole context", window)


def rope_layers(hparams: dict, block_count: int) -> list[bool]:
    """Per layer, whether it applies RoPE: `no_rope_layers` (1 = RoPE), else every layer but
    each `no_rope_layer_interval`-th, as transformers' SmolLM3Config derives it."""
    flags = hparams.get("no_rope_layers")
    if flags is None:
        interval = int(hparams.get("no_rope_layer_interval") or LLAMA_CPP_NO_ROPE_INTERVAL)
        return [(il + 1) % interval != 0 for il in range(block_count)]
    if len(flags) < block_count:
        raise ConversionError(f"config.json's no_rope_layers has {len(flags)} entries for {block_count} layers")
    return [bool(flag) for flag in flags[:block_count]]
