"""OLMo 3: OLMo 2's blocks with sliding-window attention in three layers of four, as llama.cpp's olmo2.

The tensors are OLMo 2's (post-norms, q/k RMSNorms over whole projections, untied
output); llama.cpp runs OLMo 3 as its olmo2 architecture with sliding windows:
- `sliding_window` is written, and the per-layer pattern from `layer_types`
  (transformers' default: every fourth layer attends fully), always, as llama.cpp's
  converter does;
- the rope settings are the full-attention layers': transformers 5 keeps one set per
  layer type (`rope_parameters`), and Olmo 3's long-context models scale only the
  full-attention layers with YaRN. llama.cpp's olmo2 does the same (its sliding layers
  use plain rope at the same base), so a checkpoint whose sliding layers rotate with
  another base or scaling is refused: llama.cpp would run a different model.
"""

from __future__ import annotations

from typing import Any

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.olmo2 import Olmo2Model
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

_SLIDING, _FULL = "sliding_attention", "full_attention"
# transformers' Olmo3Config: without layer_types, every 4th layer attends fully (llama.cpp's default too).
_FULL_EVERY = 4


@register("Olmo3ForCausalLM")
class Olmo3Model(Olmo2Model):
    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        if self.hparams.get("attention_bias"):
            raise ConversionError(
                "config.json sets attention_bias: llama.cpp's olmo2 (which runs OLMo 3) has no attention biases"
            )
        self._check_sliding_rope()

    def layer_types(self) -> list[str]:
        """Each layer's attention: `layer_types`, else transformers' default pattern."""
        types = self.hparams.get("layer_types")
        if types is None:
            types = [_SLIDING if (i + 1) % _FULL_EVERY else _FULL for i in range(self.block_count)]
        if len(types) != self.block_count or not set(types) <= {_SLIDING, _FULL}:
            raise ConversionError(
                f"config.json's layer_types must name {_SLIDING} or {_FULL} for each of the "
                f"{self.block_count} layers; got {types}"
            )
        return list(types)

    @property
    def rope(self) -> dict[str, Any]:
        """The full-attention layers' rope, which the base writes as the model's."""
        return self.layer_rope(_FULL)

    def layer_rope(self, layer_type: str) -> dict[str, Any]:
        """One kind of layer's rope (`layer_kind_rope`), Olmo3Config's default base where none is named."""
        return self.layer_kind_rope(layer_type, self.hparams.get("rope_theta", 500_000.0))

    def _check_sliding_rope(self) -> None:
        """Refuse rope settings llama.cpp's olmo2 would apply differently from transformers: it
        rotates sliding-window layers with the model's base and no scaling, and without a window
        it runs every layer as a full-attention one, scaling included."""
        if _SLIDING not in self.layer_types():
            return
        local, full = self.layer_rope(_SLIDING), self.rope
        if (local.get("rope_type") or "default") != "default":
            raise ConversionError(
                f"rope scaling type {local['rope_type']!r} on sliding-window layers is not supported: "
                "llama.cpp's olmo2 uses plain rope there"
            )
        if float(local["rope_theta"]) != float(full["rope_theta"]):
            raise ConversionError(
                f"the sliding-window layers' rope_theta ({local['rope_theta']}) differs from the "
                f"full-attention layers' ({full['rope_theta']}): llama.cpp's olmo2 uses one base for both"
            )
        if not self._window() and (full.get("rope_type") or "default") != "default":
            raise ConversionError(
                "this OLMo 3 checkpoint has no sliding_window but scales rope on its full-attention "
                "layers only; llama.cpp's olmo2 then scales every layer: it would run a different model"
            )

    def _window(self) -> int | None:
        window = self.hparams.get("sliding_window")
        return int(window) if window else None

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        window = self._window()
        if window is None:
            return  # transformers attends fully in every layer; so does llama.cpp without a window
        writer.add_sliding_window(window)
        writer.add_sliding_window_pattern([t == _SLIDING for t in self.layer_types()])
        if _SLIDING in (self.hparams.get("rope_parameters") or {}):  # as llama.cpp's converter: only if given
            writer.add_rope_freq_base_swa(float(self.layer_rope(_SLIDING)["rope_theta"]))

    @classmethod
    def reads_gguf(cls, keys) -> bool:
        return keys.arch == "olmo2" and keys.has("attention.sliding_window")

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        full = rope_parameters(keys)
        sliding = {"rope_type": "default", "rope_theta": keys.get("rope.freq_base_swa", full["rope_theta"])}
        config = {
            "model_type": "olmo3", "architectures": ["Olmo3ForCausalLM"], **decoder_config(keys),
            "sliding_window": keys.get("attention.sliding_window"),
            "rope_parameters": {_FULL: full, _SLIDING: sliding},
        }
        pattern = keys.get("attention.sliding_window_pattern")
        if pattern:  # else transformers' default, every 4th layer full, as llama.cpp's
            config["layer_types"] = [_SLIDING if sliding_layer else _FULL for sliding_layer in pattern]
        return config

