"""The architecture registry and what every decoder-only transformer shares.

Each supported family is a small subclass of `ArchModel`, registered under
the Hugging Face `architectures` names it handles, overriding only hooks:

- `set_parameters(writer)`: hyperparameters as GGUF keys;
- `set_vocab(writer)`: the tokenizer;
- `skip_tensor(name)`: checkpoint tensors that are not part of the GGUF;
- `modify_tensor(name, gguf_name, data)`: rewrite one tensor (e.g. Llama's q/k permutation);
- `extra_tensors()`: tensors computed from the config (e.g. Llama 3 rope factors).

Tensor names come from gguf's `TensorNameMap` (the same table llama.cpp's
converter uses), hyperparameter keys from `GGUFWriter`'s helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.vocab import load_vocab

log = logging.getLogger(__name__)


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint's architecture has no exporter."""


_REGISTRY: dict[str, type[ArchModel]] = {}


def register(*hf_names: str) -> Callable[[type[ArchModel]], type[ArchModel]]:
    def add(cls: type[ArchModel]) -> type[ArchModel]:
        for name in hf_names:
            _REGISTRY[name] = cls
        return cls

    return add


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(config: dict[str, Any]) -> type[ArchModel]:
    names = config.get("architectures") or []
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    found = ", ".join(names) if names else f"none listed (model_type {config.get('model_type', '?')})"
    raise UnsupportedArchitectureError(
        f"unsupported architecture: {found}; supported: {', '.join(supported_architectures())}"
    )


class ArchModel:
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # Checkpoint tensors that are derived state, never weights.
    _SKIP_SUFFIXES: ClassVar[tuple[str, ...]] = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        self.checkpoint = checkpoint
        self.hparams = checkpoint.config
        self.pre_tokenizer = pre_tokenizer
        self.block_count = int(self._param("num_hidden_layers", "n_layer", "num_layers"))
        self.tensor_map = gguf.get_tensor_name_map(self.gguf_arch, self.block_count)
        self.n_head = int(self._param("num_attention_heads", "n_head"))
        self.n_head_kv = int(self.hparams.get("num_key_value_heads") or self.n_head)
        self.tied_embeddings = bool(self.hparams.get("tie_word_embeddings", False))

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def _param(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if self.hparams.get(key) is not None:
                return self.hparams[key]
        if default is not None:
            return default
        raise ConversionError(f"config.json has none of {', '.join(keys)}")

    @property
    def rope(self) -> dict[str, Any]:
        """Rope settings: transformers 5's `rope_parameters`, or 4.x's `rope_scaling` + `rope_theta`."""
        params = dict(self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {})
        params.setdefault("rope_theta", self.hparams.get("rope_theta"))
        if "rope_type" not in params and "type" in params:
            params["rope_type"] = params["type"]
        return params

    # -- hooks -----------------------------------------------------------------

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        hp = self.hparams
        writer.add_block_count(self.block_count)
        writer.add_context_length(int(self._param("max_position_embeddings", "n_positions", "max_sequence_length")))
        writer.add_embedding_length(int(self._param("hidden_size", "n_embd")))
        writer.add_feed_forward_length(int(self._param("intermediate_size", "n_inner")))
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        self._set_rope(writer)
        writer.add_layer_norm_rms_eps(float(self._param("rms_norm_eps")))
        if hp.get("head_dim") is not None:
            writer.add_key_length(int(hp["head_dim"]))
            writer.add_value_length(int(hp["head_dim"]))

    def _set_rope(self, writer: gguf.GGUFWriter) -> None:
        rope = self.rope
        kind = (rope.get("rope_type") or "default").lower()
        factor = rope.get("factor")
        if kind == "linear" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(factor))
        elif kind == "yarn" and factor is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(factor))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            for key, add in (
                ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
            ):
                if rope.get(key) is not None:
                    add(float(rope[key]))
        elif kind not in ("default", *self.extra_rope_types()):
            raise ConversionError(f"rope scaling type {kind!r} is not supported for {self.checkpoint.architecture}")
        if rope.get("rope_theta") is not None:
            writer.add_rope_freq_base(float(rope["rope_theta"]))

    def extra_rope_types(self) -> tuple[str, ...]:
        """Rope types a subclass handles itself (in extra_tensors)."""
        return ()

    def set_vocab(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        vocab = load_vocab(self.checkpoint.path, self.hparams, pre_tokenizer=self.pre_tokenizer)
        vocab.add_to(writer, chat_template)

    def skip_tensor(self, name: str) -> bool:
        if name.endswith(self._SKIP_SUFFIXES):
            return True
        # Tied: the output projection *is* the embedding (transformers ignores a stored copy).
        return self.tied_embeddings and name == "lm_head.weight"

    def modify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        return data

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        return ()

    def gguf_name(self, name: str) -> str:
        mapped = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"cannot map tensor {name!r} of {self.checkpoint.architecture} to a GGUF name")
        return mapped

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        """Fail before writing if a tensor llama.cpp requires is missing."""
        names = set(gguf_names)
        required = [gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
        if not self.tied_embeddings:
            required.append(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight")
        for bid in range(self.block_count):
            required.append(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_Q].format(bid=bid) + ".weight")
        missing = [n for n in required if n not in names]
        if missing:
            raise ConversionError(
                f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}"
            )
