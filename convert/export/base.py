"""What every decoder-only transformer shares: `ArchModel`, its hooks and the shape rules.

Each supported family is a small subclass of `ArchModel`, registered under
the Hugging Face `architectures` names it handles (convert/export/registry.py),
overriding only hooks:

- `set_parameters(writer)`: hyperparameters as GGUF keys;
- `set_vocab(writer)`: the tokenizer;
- `skip_tensor(name)`: checkpoint tensors that are not part of the GGUF;
- `modify_tensor(name, gguf_name, data)`: rewrite one tensor (e.g. Llama's q/k permutation);
- `extra_tensors()`: tensors computed from the config (e.g. Llama 3 rope factors);
- `combined_tensors()`: GGUF tensors assembled from several checkpoint tensors (e.g. experts).

Tensor names come from gguf's `TensorNameMap` (the same table llama.cpp's
converter uses), hyperparameter keys from `GGUFWriter`'s helpers. Families
whose feed-forward blocks are mixtures of experts build on convert/export/moe.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint
from convert.export.vocab import TokenizerError, Vocab, load_vocab

if TYPE_CHECKING:
    from convert.export.gguf_keys import GgufKeys


class ArchModel:
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    # The tokenizer kinds (tokenizer.ggml.model: "llama" = SentencePiece, "gpt2" = byte-level BPE)
    # the family's checkpoints ship; empty = any. Another kind fails before anything is written.
    expected_tokenizers: ClassVar[tuple[str, ...]] = ()
    # llama.cpp's own name for the family's tokenizer where it splits text exactly like a name the
    # pre-tokenizer table detects: llama.cpp names a tokenizer by hashing the ids its real
    # vocabulary gives, so one split has several names (Granite 3's is "refact", SmolLM's "smollm").
    pre_tokenizer_names: ClassVar[dict[str, str]] = {}
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

    def layer_kind_rope(self, layer_type: str, default_theta: float | None) -> dict[str, Any]:
        """The rope of one kind of layer ("full_attention" or "sliding_attention") in a model whose
        kinds differ (Gemma 3, OLMo 3): transformers 5's per-kind `rope_parameters`, or 4.x's
        `rope_scaling` (full-attention layers only); `default_theta` where they name no base."""
        params = self.hparams.get("rope_parameters") or {}
        if "full_attention" in params or "sliding_attention" in params:
            rope = dict(params.get(layer_type) or {})
        elif layer_type == "full_attention":
            rope = dict(params or self.hparams.get("rope_scaling") or {})
        else:
            rope = {}
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        if rope.get("rope_theta") is None:
            rope["rope_theta"] = default_theta
        return rope

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
        vocab = self.load_vocab()
        vocab.add_to(writer, chat_template)

    def load_vocab(self) -> Vocab:
        """The checkpoint's tokenizer, refused if it is not a kind the family expects."""
        vocab = load_vocab(self.checkpoint.path, self.hparams, pre_tokenizer=self.pre_tokenizer)
        if self.pre_tokenizer is None:  # detected, not given with --pre-tokenizer
            vocab.pre = self.pre_tokenizer_names.get(vocab.pre, vocab.pre)
        if self.expected_tokenizers and vocab.model not in self.expected_tokenizers:
            wanted = " or ".join(_TOKENIZER_KINDS.get(k, k) for k in self.expected_tokenizers)
            raise TokenizerError(
                f"{self.checkpoint.architecture} expects a {wanted} tokenizer, but this checkpoint's is "
                f"{_TOKENIZER_KINDS.get(vocab.model, vocab.model)}: a tokenizer from another model family?"
            )
        return vocab

    def skip_tensor(self, name: str) -> bool:
        if name.endswith(self._SKIP_SUFFIXES):
            return True
        # Tied: the output projection *is* the embedding (transformers ignores a stored copy).
        return self.tied_embeddings and name == "lm_head.weight"

    def modify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        return data

    def moves_values_only(self, name: str, gguf_name: str) -> bool:
        """Whether modify_tensor at most moves this tensor's values (reshape, permute, slice) and
        computes none. Casting then commutes with it, so the exporter narrows an F16-bound tensor
        as it reads it, never holding a float32 copy. Default: yes, unless modify_tensor is overridden."""
        return type(self).modify_tensor is ArchModel.modify_tensor

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        return ()

    # -- reading a GGUF back (convert/gguf_read_back.py) -------------------------

    @classmethod
    def reads_gguf(cls, keys: GgufKeys) -> bool:
        """Whether convert/gguf_read_back.py reads a GGUF back as this family: one of its llama.cpp
        architecture, where the family itself says how (`config_from_gguf`). Families that share an
        architecture (llama: Llama or Mixtral; olmo2: OLMo 2 or 3) tell their files apart here."""
        return "config_from_gguf" in vars(cls) and keys.arch == gguf.MODEL_ARCH_NAMES[cls.gguf_arch]

    @classmethod
    def config_from_gguf(cls, keys: GgufKeys) -> dict[str, Any]:
        """config.json (with `model_type`) for the model a GGUF of this family holds."""
        raise NotImplementedError

    @classmethod
    def left_out_of_checkpoint(cls, keys: GgufKeys, gguf_name: str) -> bool:
        """A GGUF tensor transformers' model has no place for (e.g. an MTP layer's), dropped on reading back."""
        return False

    def extra_tensor_source(self, gguf_name: str, data: np.ndarray) -> tuple[str, np.ndarray] | None:
        """For an `extra_tensors` tensor computed from a checkpoint tensor: that tensor, read back
        from `data`. None for one computed from config.json alone (rope factors)."""
        return None

    def unmodify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """The checkpoint tensor `modify_tensor` turned into `data`, where it computes values."""
        raise ConversionError(f"{gguf_name} cannot be read back into {name}")

    def combined_tensors(self) -> list[CombinedTensor]:
        """GGUF tensors built from several checkpoint tensors; their sources are not exported alone."""
        return []

    def gguf_name(self, name: str) -> str:
        mapped = self.tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"cannot map tensor {name!r} of {self.checkpoint.architecture} to a GGUF name")
        return mapped

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        """The shape (rows first) config.json implies for a checkpoint tensor, or None if unchecked.

        The default covers the standard llama-like tensors (embeddings, attention and MLP
        projections, their biases, the main norms); families with other layouts override it.
        """
        rule = _shape_rule(name, gguf_name)
        if rule is None:
            return None
        dims = self._shape_dims()
        expected = tuple(dims.get(label) for label in rule)
        return None if None in expected else expected  # a size config.json does not give

    def check_shape(self, name: str, gguf_name: str, shape: tuple[int, ...]) -> None:
        """Fail before writing when a tensor's shape disagrees with config.json."""
        expected = self.expected_shape(name, gguf_name)
        if expected is None or tuple(shape) == tuple(expected):
            return
        rule = _shape_rule(name, gguf_name) if type(self).expected_shape is ArchModel.expected_shape else None
        why = f" ({', '.join(rule)})" if rule else ""
        raise ConversionError(
            f"tensor {name} has shape {list(shape)}, but config.json implies {list(expected)}{why}: "
            "the config and the weights disagree"
        )

    def _shape_dims(self) -> dict[str, int | None]:
        hp = self.hparams
        hidden = hp.get("hidden_size") or hp.get("n_embd")
        head_dim = hp.get("head_dim") or (hidden // self.n_head if hidden else None)
        intermediate = hp.get("intermediate_size") or hp.get("n_inner")
        return {
            "vocab_size": hp.get("vocab_size"),
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "2 × intermediate_size": 2 * intermediate if intermediate else None,
            "num_attention_heads × head_dim": self.n_head * head_dim if head_dim else None,
            "num_key_value_heads × head_dim": self.n_head_kv * head_dim if head_dim else None,
        }

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


# -- tensors assembled from several checkpoint tensors -------------------------------


@dataclass(frozen=True)
class CombinedTensor:
    """One GGUF tensor assembled from checkpoint tensors, each read in turn.

    A source is first cut to the `part`-th of `parts` equal blocks of rows (its
    second-to-last axis: a fused gate_up_proj holds gate, then up). With `stack` the
    pieces become the slices of a new first axis (one layer's experts); without it
    the single source's piece is the tensor.
    """

    name: str  # GGUF name
    sources: tuple[str, ...]
    stack: bool = True
    part: int = 0
    parts: int = 1

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The tensor's shape (numpy order), given the shape every source has."""
        piece = source_shape
        if self.parts > 1:
            piece = (*source_shape[:-2], source_shape[-2] // self.parts, source_shape[-1])
        return (len(self.sources), *piece) if self.stack else piece

    def assemble(self, read: Callable[[str], np.ndarray], dtype: np.dtype) -> np.ndarray:
        """The tensor's data: each source read, cut and copied into place, then freed."""
        if not self.stack:
            return np.ascontiguousarray(self._piece(read(self.sources[0])), dtype=dtype)
        out: np.ndarray | None = None
        for i, source in enumerate(self.sources):
            piece = self._piece(read(source))
            if out is None:
                out = np.empty((len(self.sources), *piece.shape), dtype=dtype)
            out[i] = piece
            del piece
        assert out is not None
        return out

    def _piece(self, data: np.ndarray) -> np.ndarray:
        if self.parts == 1:
            return data
        rows = data.shape[-2] // self.parts
        return data[..., self.part * rows : (self.part + 1) * rows, :]


# -- what config.json implies for the standard tensors -----------------------------

_TOKENIZER_KINDS = {"llama": "SentencePiece", "gpt2": "byte-level BPE"}

_T = gguf.MODEL_TENSOR
_QO = "num_attention_heads × head_dim"
_KV = "num_key_value_heads × head_dim"
# GGUF tensor kind -> the config sizes of its shape, rows first (the checkpoint's own layout).
_SHAPE_RULES: dict[gguf.MODEL_TENSOR, tuple[str, ...]] = {
    _T.TOKEN_EMBD: ("vocab_size", "hidden_size"),
    _T.OUTPUT: ("vocab_size", "hidden_size"),
    _T.OUTPUT_NORM: ("hidden_size",),
    _T.ATTN_NORM: ("hidden_size",),
    _T.FFN_NORM: ("hidden_size",),
    _T.ATTN_Q: (_QO, "hidden_size"),
    _T.ATTN_K: (_KV, "hidden_size"),
    _T.ATTN_V: (_KV, "hidden_size"),
    _T.ATTN_OUT: ("hidden_size", _QO),
    _T.FFN_GATE: ("intermediate_size", "hidden_size"),
    _T.FFN_UP: ("intermediate_size", "hidden_size"),
    _T.FFN_DOWN: ("hidden_size", "intermediate_size"),
}
_KIND_BY_NAME = {gguf.TENSOR_NAMES[kind]: kind for kind in _SHAPE_RULES}


def _shape_rule(name: str, gguf_name: str) -> tuple[str, ...] | None:
    """The default rule for one tensor, by its GGUF kind; a bias has its weight's rows."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        base = ".".join(["blk", "{bid}", *parts[2:]])
    kind = _KIND_BY_NAME.get(base)
    if kind is None or suffix not in ("weight", "bias"):
        return None
    rule = _SHAPE_RULES[kind]
    if kind is _T.FFN_UP and name.split(".")[-2:-1] == ["gate_up_proj"]:  # fused gate + up (Phi-3, GLM-4)
        rule = ("2 × intermediate_size", "hidden_size")
    return rule[:1] if suffix == "bias" else rule
