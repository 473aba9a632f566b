"""ERNIE 4.5: dense (`Ernie4_5ForCausalLM`, llama.cpp's ernie4_5) and MoE (`Ernie4_5_MoeForCausalLM`, ernie4_5-moe).

Llama-like blocks with what differs:
- rope on adjacent pairs of each head's dimensions (transformers' Ernie4_5 rotates interleaved
  dimensions), llama.cpp's "normal" rope: no q/k permutation, unlike Llama;
- head_dim need not be hidden/heads (ERNIE-4.5-0.3B: 128 × 16 heads for a width of 1024);
- the 0.3B model ties its output projection to the embeddings;
- `use_bias` would add biases to every projection, MLP included; llama.cpp's ernie4_5 has
  none in the MLP, so such a checkpoint is refused.

The MoE model has `moe_layer_start_index` dense layers first, then a mixture of experts in
every layer (llama.cpp's `leading_dense_block_count`), each with `moe_k` of
`moe_num_experts` experts chosen by softmax scores plus a per-expert correction bias
(`moe_statics.e_score_correction_bias`, llama.cpp's exp_probs_b, used for the choice only),
renormalized, plus `moe_num_shared_experts` shared experts as one MLP of that many times
`moe_intermediate_size`. llama.cpp loads experts in every layer after the leading dense ones
and has no end index, so other layer layouts are refused. The multi-token-prediction
layers some checkpoints carry are not part of llama.cpp's model and are left out.

The tokenizer is SentencePiece: from tokenizer.model, or, saved by transformers 5 as tokenizer.json
alone, as llama.cpp's SentencePiece model scored by merge rank without a dummy prefix (as a
SentencePiece-style BPE llama.cpp would start every prompt with a BOS token, which ERNIE never sees).
ERNIE's tokenizer adds no space before the text (tokenizer_config's `add_prefix_space:
false`), which is written as llama.cpp's converter writes it, and its template ends each
assistant turn with <|end_of_sentence|>, which we set as end of turn so that llama.cpp
stops there.
"""

from __future__ import annotations

import json
import re
from typing import Any

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.checkpoint import Checkpoint
from convert.export.moe import MixtureOfExperts
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register
from convert.export.vocab import Vocab, spm_json_vocab
from convert.export.vocab_spm_json import UnsupportedSpmJson, spm_style

_END_OF_TURN = "<|end_of_sentence|>"
# ERNIE's original (PaddlePaddle) layout fuses these; transformers' checkpoints split them.
_FUSED = (".qkv_proj.", ".up_gate_proj.")
# Multi-token prediction layers, after the model's own (transformers: `mtp`, llama.cpp: model.mtp_*).
_MTP = re.compile(r"(?:^|\.)mtp(?:_|\.)")


class _ErnieFamily(ArchModel):
    expected_tokenizers = ("llama",)

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        if self.hparams.get("use_bias"):
            raise ConversionError(
                "config.json sets use_bias: llama.cpp's ERNIE 4.5 has no biases in the MLP"
            )
        fused = next((n for n in checkpoint.tensors if any(f in n for f in _FUSED)), None)
        if fused is not None:
            raise ConversionError(
                f"tensor {fused} is fused (ERNIE's original PaddlePaddle layout); use a checkpoint saved "
                "by transformers, with separate q/k/v and gate/up projections"
            )

    def set_vocab(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        vocab = self.load_vocab()
        vocab.add_to(writer, chat_template)
        prefix = False if self._sentencepiece_json_only() else self._tokenizer_config().get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(bool(prefix))

    def load_vocab(self) -> Vocab:
        if self._sentencepiece_json_only():
            # As transformers 5 saves it (tokenizer.json, no tokenizer.model): written as llama.cpp's
            # SentencePiece model scored by merge rank, without the dummy prefix (add_space_prefix
            # false). As a SentencePiece-style BPE ("gemma4") llama.cpp would add a BOS to every prompt.
            path = self.checkpoint.path
            tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = spm_json_vocab(path, self.hparams, tokenizer)
        else:
            vocab = super().load_vocab()
        ids = {token: i for i, token in enumerate(vocab.tokens)}
        end_of_turn = ids.get(_END_OF_TURN.encode("utf-8"))
        if end_of_turn is not None:
            vocab.special._set_special_token("eot", end_of_turn)  # kept if the tokenizer files set one
        return vocab

    def _sentencepiece_json_only(self) -> bool:
        """A SentencePiece tokenizer without a dummy prefix (ERNIE's) saved as tokenizer.json only, as
        transformers 5 saves it. Any other tokenizer.json is left to the base, which names its kind."""
        path = self.checkpoint.path
        if (path / "tokenizer.model").is_file() or not (path / "tokenizer.json").is_file():
            return False
        try:
            style = spm_style(json.loads((path / "tokenizer.json").read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, UnsupportedSpmJson, AttributeError):
            return False  # unreadable or unusual: the base's reader says what is wrong
        return style is not None and not style.dummy_prefix  # with one, it is llama.cpp's SentencePiece

    def _tokenizer_config(self) -> dict:
        path = self.checkpoint.path / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConversionError(f"cannot read {path}: {exc}") from None
        return config if isinstance(config, dict) else {}

    def skip_tensor(self, name: str) -> bool:
        return bool(_MTP.search(name)) or super().skip_tensor(name)


    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        return {**decoder_config(keys), "rope_parameters": rope_parameters(keys), "use_bias": False}


@register("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM")
class Ernie45Model(_ErnieFamily):
    gguf_arch = gguf.MODEL_ARCH.ERNIE4_5

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        return {"model_type": "ernie4_5", "architectures": ["Ernie4_5ForCausalLM"], **super().config_from_gguf(keys)}


@register("Ernie4_5_MoeForCausalLM")
class Ernie45MoeModel(_ErnieFamily, MixtureOfExperts):
    gguf_arch = gguf.MODEL_ARCH.ERNIE4_5_MOE
    _EXPERT_COUNT_KEYS = ("moe_num_experts", "num_experts")
    _EXPERT_USED_KEYS = ("moe_k", "num_experts_per_tok")

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        super().__init__(checkpoint, pre_tokenizer=pre_tokenizer)
        self.first_moe_layer = int(self.hparams.get("moe_layer_start_index", 1))
        interval = int(self.hparams.get("moe_layer_interval") or 1)
        end = self.hparams.get("moe_layer_end_index", -1)
        last = self.block_count - 1 if end in (None, -1) else int(end)
        if interval != 1 or last != self.block_count - 1 or not 0 <= self.first_moe_layer < self.block_count:
            raise ConversionError(
                f"this ERNIE 4.5 MoE has experts in layers {self.first_moe_layer} to {last}, every {interval}; "
                "llama.cpp's ernie4_5-moe needs them in every layer from the first MoE layer to the last"
            )

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        return {
            "model_type": "ernie4_5_moe", "architectures": ["Ernie4_5_MoeForCausalLM"], **super().config_from_gguf(keys),
            "moe_num_experts": keys.need("expert_count"), "moe_k": keys.need("expert_used_count"),
            "moe_layer_start_index": keys.get("leading_dense_block_count", 0), "moe_layer_interval": 1,
            "moe_layer_end_index": keys.need("block_count") - 1,
            "moe_intermediate_size": keys.need("expert_feed_forward_length"),
            "moe_num_shared_experts": keys.get("expert_shared_count", 0),
        }

    @property
    def shared_expert_length(self) -> int:
        return int(self.hparams.get("moe_num_shared_experts") or 0) * int(self._param("moe_intermediate_size"))

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_interleave_moe_layer_step(1)
        writer.add_leading_dense_block_count(self.first_moe_layer)
        writer.add_expert_feed_forward_length(int(self._param("moe_intermediate_size")))
        if self.hparams.get("moe_num_shared_experts") is not None:
            writer.add_expert_shared_count(int(self.hparams["moe_num_shared_experts"]))
        if self.shared_expert_length:
            writer.add_expert_shared_feed_forward_length(self.shared_expert_length)

    def gguf_name(self, name: str) -> str:
        # gguf's map knows the correction bias as `e_score_correction` with a `.bias` suffix.
        return super().gguf_name(name.replace("e_score_correction_bias", "e_score_correction.bias"))

    @property
    def leading_dense_layers(self) -> tuple[int, str]:
        return self.first_moe_layer, "moe_layer_start_index"
