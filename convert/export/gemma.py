"""Gemma 2 and Gemma 3 (text): llama.cpp's gemma2 and gemma3 architectures.

What differs from the shared base, written as llama.cpp's converter writes it:
- RMSNorm weights are stored as an offset from 1 (transformers computes
  x * (1 + w)), so 1 is added to every `*norm.weight` (Gemma 3's q/k norms too);
- the embeddings are scaled by sqrt(hidden_size) on the way in: llama.cpp does
  that itself, nothing is written for it;
- the output projection is the embedding matrix (Gemma 2 always; Gemma 3 unless
  the config unties it);
- soft-capping: Gemma 2 caps attention scores and final logits, Gemma 3 may cap
  final logits (its config has no attention cap, and llama.cpp's gemma3 has none);
- sliding-window attention on some layers: the window is written. Which layers
  slide, llama.cpp takes from its own default pattern (every 2nd layer global in
  gemma2, every 6th in gemma3, as transformers' defaults). llama.cpp's converter
  never writes the pattern; we write it, per layer, only when config.json's
  `layer_types` differ from that default (the converter's file then runs some
  layers with the wrong attention);
- `query_pre_attn_scalar`: llama.cpp has no key for it and derives the query
  scale from the model (1/sqrt(head_dim); 1/sqrt(hidden_size / heads) for the
  27B sizes). A config that needs another scale is refused;
- Gemma 3's local (sliding) layers use `rope_local_base_freq` (rope.freq_base_swa),
  its global layers `rope_theta` with the config's linear scaling (4B and up);
- `Gemma3ForConditionalGeneration` (4B and up): only the language model is
  written, as llama.cpp's gemma3 (its converter writes the vision tower and the
  projector to a separate mmproj file); `text_config` holds the settings, and
  its released configs leave most of them to transformers' defaults, which are
  filled in from GEMMA2_DEFAULTS / GEMMA3_DEFAULTS, as transformers fills them;
- the tokenizer is SentencePiece without a space prefix: from `tokenizer.model` as llama.cpp's
  "llama" model, or, saved by transformers 5 as `tokenizer.json` only, as llama.cpp's
  SentencePiece-style BPE ("gpt2" model, "gemma4" pre-tokenizer), as its converter writes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.checkpoint import Checkpoint
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

# transformers' config defaults (Gemma2Config, Gemma3TextConfig) for what a config.json leaves out.
GEMMA2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 256_000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}
GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}

# Tensors of Gemma3ForConditionalGeneration outside the language model (as saved by transformers 4 and 5).
_NOT_LANGUAGE_MODEL = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_SLIDING, _FULL = "sliding_attention", "full_attention"


class GemmaModel(ArchModel):
    """What Gemma 2 and Gemma 3 share."""

    # SentencePiece from tokenizer.model, or the same saved as tokenizer.json only (vocab_spm_json.py).
    expected_tokenizers = ("llama", "gpt2")
    defaults: ClassVar[dict[str, Any]]
    # llama.cpp's sliding-window pattern when the file gives none: every n-th layer is global.
    default_swa_pattern: ClassVar[int]
    # The layer count of the size whose queries llama.cpp scales by 1/sqrt(hidden_size / heads) (27B).
    scaled_by_hidden_layers: ClassVar[int]
    # Whether llama.cpp attends fully in every layer when the file has no window (gemma3), or
    # keeps sliding-window attention with its default window and pattern (gemma2).
    no_window_means_full_attention: ClassVar[bool]

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        config = {**self.defaults, **checkpoint.config}
        super().__init__(dataclasses.replace(checkpoint, config=config), pre_tokenizer=pre_tokenizer)

    # -- hyperparameters -------------------------------------------------------------

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        self._check_attention_scale()
        self._set_sliding_window(writer)

    def _check_attention_scale(self) -> None:
        hidden, head_dim = int(self.hparams["hidden_size"]), int(self.hparams["head_dim"])
        if self.block_count == self.scaled_by_hidden_layers:
            used, how = hidden / self.n_head, "hidden_size / num_attention_heads"
        else:
            used, how = head_dim, "head_dim"
        wanted = float(self.hparams["query_pre_attn_scalar"])
        if wanted != used:
            raise ConversionError(
                f"query_pre_attn_scalar is {self.hparams['query_pre_attn_scalar']}, but llama.cpp's "
                f"{self.arch_name} scales queries by 1/sqrt({how}) = 1/sqrt({used:g}) for a "
                f"{self.block_count}-layer model; it has no setting for another scale"
            )

    def layer_types(self) -> list[str]:
        """Each layer's attention, as transformers derives it: `layer_types`, else the pattern."""
        types = self.hparams.get("layer_types")
        if types is None:
            pattern = int(
                self.hparams.get("sliding_window_pattern")
                or self.hparams.get("_sliding_window_pattern")
                or self.default_swa_pattern
            )
            types = [_SLIDING if (i + 1) % pattern else _FULL for i in range(self.block_count)]
        if len(types) != self.block_count or not set(types) <= {_SLIDING, _FULL}:
            raise ConversionError(
                f"config.json's layer_types must name {_SLIDING} or {_FULL} for each of the "
                f"{self.block_count} layers; got {types}"
            )
        return list(types)

    def _set_sliding_window(self, writer: gguf.GGUFWriter) -> None:
        sliding = [t == _SLIDING for t in self.layer_types()]
        if self.hparams.get("sliding_window") is None:
            sliding = [False] * self.block_count
        if any(sliding):
            writer.add_sliding_window(int(self.hparams["sliding_window"]))
        elif self.no_window_means_full_attention:
            return
        n = self.default_swa_pattern
        if sliding != [(i + 1) % n != 0 for i in range(self.block_count)]:
            writer.add_sliding_window_pattern(sliding)

    # -- tokenizer -------------------------------------------------------------------

    def set_vocab(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        vocab = self.load_vocab()
        vocab.add_to(writer, chat_template)
        if vocab.model == "llama":
            writer.add_add_space_prefix(False)  # Gemma's SentencePiece model adds no dummy prefix

    # -- tensors ---------------------------------------------------------------------

    def skip_tensor(self, name: str) -> bool:
        if name.startswith(_NOT_LANGUAGE_MODEL):
            return True
        return super().skip_tensor(_language_model_name(name))

    def gguf_name(self, name: str) -> str:
        return super().gguf_name(_language_model_name(name))

    def modify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        if name.endswith("norm.weight"):
            return data + 1  # stored as an offset from 1; in the tensor's own dtype, as llama.cpp's converter
        return data

    def moves_values_only(self, name: str, gguf_name: str) -> bool:
        return not name.endswith("norm.weight")  # only the norms are computed (+1)

    def unmodify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        return data - np.float32(1)  # a norm, less its offset

    @classmethod
    def gemma_config(cls, keys) -> dict[str, Any]:
        """What Gemma 2 and 3 share: head size, query scale, sliding window and its layer pattern
        (transformers' GGUF reader drops the soft-capping, the local rope base and the pattern)."""
        config = decoder_config(keys)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        scaled_by_hidden = config["num_hidden_layers"] == cls.scaled_by_hidden_layers
        pattern = keys.get("attention.sliding_window_pattern")
        n = config["num_hidden_layers"]
        if pattern is None:
            pattern = [(i + 1) % cls.default_swa_pattern != 0 for i in range(n)]
        window = keys.get("attention.sliding_window")
        if window is None and cls.no_window_means_full_attention:
            pattern = [False] * n
        return {**config, "head_dim": head_dim, "tie_word_embeddings": True,
                "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if scaled_by_hidden
                else head_dim,
                "sliding_window": window, "layer_types": [_SLIDING if s else _FULL for s in pattern],
                "hidden_activation": "gelu_pytorch_tanh"}


def _language_model_name(name: str) -> str:
    """A conditional-generation checkpoint's language-model tensor under the causal LM's name."""
    return name.replace("language_model.", "")


@register("Gemma2ForCausalLM")
class Gemma2Model(GemmaModel):
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    defaults = GEMMA2_DEFAULTS
    default_swa_pattern = 2
    scaled_by_hidden_layers = 46
    no_window_means_full_attention = False

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        if not self.tied_embeddings and "lm_head.weight" in self.checkpoint.tensors:
            raise ConversionError(
                "this Gemma 2 checkpoint has its own lm_head (tie_word_embeddings is false), but "
                "llama.cpp's gemma2 always uses the embeddings as the output projection"
            )
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if not self.hparams.get(key):
                raise ConversionError(
                    f"config.json's {key} is {self.hparams.get(key)}: llama.cpp's gemma2 always soft-caps"
                )

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        return {**cls.gemma_config(keys), "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"],
                "rope_parameters": rope_parameters(keys),
                "attn_logit_softcapping": keys.need("attn_logit_softcapping"),
                "final_logit_softcapping": keys.need("final_logit_softcapping")}

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_attn_logit_softcapping(float(self.hparams["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(self.hparams["final_logit_softcapping"]))

    def _set_rope(self, writer: gguf.GGUFWriter) -> None:
        rope = self.rope
        default_type = (rope.get("rope_type") or "default") == "default"
        if default_type and float(rope.get("rope_theta") or 10_000.0) == 10_000.0:
            return  # llama.cpp's defaults; its converter writes no rope keys for Gemma 2
        super()._set_rope(writer)

    def skip_tensor(self, name: str) -> bool:
        return name == "lm_head.weight" or super().skip_tensor(name)


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3Model(GemmaModel):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    defaults = GEMMA3_DEFAULTS
    # A tokenizer.json-only Gemma 3: llama.cpp's converter names its SentencePiece-style BPE by the
    # hash of the ids Gemma 3's vocabulary gives, which its table files under an embedding model
    # built on Gemma 3's tokenizer. Same pre-tokenizer in llama.cpp as "gemma4"; the same name here.
    pre_tokenizer_names = {"gemma4": "granite-embed-multi-311m"}
    default_swa_pattern = 6
    scaled_by_hidden_layers = 62
    no_window_means_full_attention = True

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        if self.hparams.get("attn_logit_softcapping") is not None:
            raise ConversionError(
                "config.json sets attn_logit_softcapping: llama.cpp's gemma3 has no attention soft-capping"
            )
        if self.hparams.get("use_bidirectional_attention"):
            raise ConversionError(
                "use_bidirectional_attention is set: an embedding model, not a causal language model"
            )

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        full = rope_parameters(keys)
        full["rope_theta"] = keys.get("rope.freq_base", GEMMA3_DEFAULTS["rope_theta"])
        local = {"rope_type": "default",
                 "rope_theta": keys.get("rope.freq_base_swa", GEMMA3_DEFAULTS["rope_local_base_freq"])}
        return {**cls.gemma_config(keys), "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
                "rope_parameters": {_FULL: full, _SLIDING: local}, "attn_logit_softcapping": None,
                "final_logit_softcapping": keys.get("final_logit_softcapping")}

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        local = self.layer_rope(_SLIDING)
        if (local.get("rope_type") or "default") != "default":
            raise ConversionError(
                f"rope scaling type {local['rope_type']!r} on sliding-window layers is not supported: "
                "llama.cpp's gemma3 scales only the global layers' rope"
            )
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
        if self.hparams.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(self.hparams["final_logit_softcapping"]))

    @property
    def rope(self) -> dict[str, Any]:
        """The global (full-attention) layers' rope, which the base writes as the model's."""
        return self.layer_rope(_FULL)

    def layer_rope(self, layer_type: str) -> dict[str, Any]:
        """Rope settings of one kind of layer; a kind without its own base takes `rope_theta` (global
        layers) or `rope_local_base_freq` (local layers)."""
        rope = self.layer_kind_rope(layer_type, None)
        if rope["rope_theta"] is None:
            rope["rope_theta"] = self.hparams["rope_theta" if layer_type == _FULL else "rope_local_base_freq"]
        return rope
