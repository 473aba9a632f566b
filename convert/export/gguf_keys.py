"""A GGUF file's metadata read as a family's `config_from_gguf` needs it (convert/gguf_read_back.py).

`GgufKeys` reads `ARCH.key` values (floats as the shortest decimal that gives the stored float32,
so config.json says 1e-05, not 9.999999747378752e-06) and the tensors' shapes. `decoder_config` and
`rope_parameters` invert what `ArchModel.set_parameters` and `_set_rope` write for every family.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import TrainingError

# A special token's role -> llama.cpp's key for its id (tokenizer.ggml.*).
_SPECIAL_TOKEN_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                       "pad": "padding_token_id", "mask": "mask_token_id"}


class GgufKeys:
    """A GGUF file's metadata and tensor shapes, read as `config_from_gguf` needs them."""

    def __init__(self, reader: gguf.GGUFReader):
        self.arch = str(reader.fields["general.architecture"].contents())
        self._fields = reader.fields
        # numpy order (rows first), as the exporter plans them
        self.shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
        self._tensors = {t.name: t for t in reader.tensors}

    def values(self, name: str) -> np.ndarray:
        """A small tensor's values (e.g. rope_freqs), dequantized to float32."""
        tensor = self._tensors[name]
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(-1)

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        """`ARCH.key`'s value (floats as the shortest decimal that gives the stored float32)."""
        return self.raw(f"{self.arch}.{key}", default)

    def raw(self, full_key: str, default: Any = None) -> Any:
        field = self._fields.get(full_key)
        if field is None:
            return default
        return _readable(field.contents())

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise TrainingError(f"the GGUF has no {self.arch}.{key}: not a file llama.cpp's {self.arch} can run")
        return value

    def special_token_ids(self) -> dict[str, int]:
        """The special tokens' ids by role (bos, eos, unk, pad, mask), where the file names them."""
        ids = {}
        for role, key in _SPECIAL_TOKEN_KEYS.items():
            value = self.raw(f"tokenizer.ggml.{key}")
            if value is not None:
                ids[role] = int(value)
        return ids

    def token_ids(self) -> dict[str, int]:
        """bos/eos/pad token ids for config.json, where the file names them."""
        ids = self.special_token_ids()
        return {f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad") if role in ids}

    def vocab_size(self) -> int:
        return self.shapes["token_embd.weight"][0]

    def tied(self) -> bool:
        return "output.weight" not in self.shapes


def decoder_config(keys: GgufKeys) -> dict[str, Any]:
    """What every decoder-only family's config.json shares, as ArchModel.set_parameters wrote it."""
    heads = int(keys.need("attention.head_count"))
    config = {
        "hidden_size": keys.need("embedding_length"),
        "num_hidden_layers": keys.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": keys.get("attention.head_count_kv") or heads,
        "rms_norm_eps": keys.need("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": keys.need("context_length"),
        "vocab_size": keys.vocab_size(),
        "tie_word_embeddings": keys.tied(),
        **keys.token_ids(),
    }
    if keys.has("feed_forward_length"):
        config["intermediate_size"] = keys.get("feed_forward_length")
    if keys.has("attention.key_length"):
        config["head_dim"] = keys.get("attention.key_length")
    return config


def rope_parameters(keys: GgufKeys) -> dict[str, Any]:
    """transformers 5's rope_parameters for the rope ArchModel._set_rope wrote."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": keys.get("rope.freq_base", 10000.0)}
    kind = keys.get("rope.scaling.type")
    if kind == "linear":
        rope.update(rope_type="linear", factor=keys.need("rope.scaling.factor"))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=keys.need("rope.scaling.factor"),
                    original_max_position_embeddings=keys.need("rope.scaling.original_context_length"))
        for name, key in (("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
                          ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if keys.has(f"rope.scaling.{key}"):
                rope[name] = keys.get(f"rope.scaling.{key}")
    elif kind not in (None, "none"):
        raise TrainingError(f"base model: rope scaling {kind!r} cannot be read back")
    return rope


def _readable(value: Any) -> Any:
    if isinstance(value, float):
        return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value
