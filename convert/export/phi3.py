"""Phi-3 / Phi-3.5-mini / Phi-4-mini: llama.cpp's phi3 architecture.

What differs from the shared base, as llama.cpp's converter writes it:
- the fused `qkv_proj` (q rows, then k, then v) and `gate_up_proj` (gate rows,
  then up) are kept fused: llama.cpp's phi3 reads `attn_qkv` and a double-height
  `ffn_up`, and its rotary layout is Hugging Face's (two halves): no permutation;
- partial rotary embeddings (Phi-4-mini: 0.75 of each head) set the rope dimension count;
- LongRoPE ("longrope", formerly "su"; Phi-3.5, Phi-4-mini and the 128k Phi-3) becomes
  two tensors of per-frequency divisors, `rope_factors_short` (contexts up to
  `original_max_position_embeddings`) and `rope_factors_long`, plus the attention
  factor sqrt(1 + ln(scale) / ln(original context)); no rope scaling type is written;
- the original context length and the sliding window (0 when there is none, which
  tells Phi-4 from the others) are always written; llama.cpp disables Phi's sliding
  window at load.

Tokenizer: Phi-3/3.5 ship a SentencePiece tokenizer.model with chat markers added on top
(<|user|>, <|assistant|>, <|system|>, <|end|>, <|endoftext|>); Phi-4-mini a byte-level BPE
tokenizer.json (o200k, llama.cpp's "gpt-4o" pre-tokenizer). <|end|> and <|endoftext|>
are in llama.cpp's end-of-generation set by their text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.gguf_keys import decoder_config
from convert.export.registry import register

_LONGROPE_TYPES = ("longrope", "su")


@register("Phi3ForCausalLM")
class Phi3Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.PHI3
    expected_tokenizers = ("llama", "gpt2")

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        """(transformers' GGUF reader drops the sliding window, partial rotary and LongRoPE.)"""
        config = decoder_config(keys)
        partial = keys.need("rope.dimension_count") * config["num_attention_heads"] / config["hidden_size"]
        original = keys.need("rope.scaling.original_context_length")
        rope = {"rope_type": "default", "rope_theta": keys.get("rope.freq_base", 10000.0),
                "partial_rotary_factor": partial, "original_max_position_embeddings": original}
        if "rope_factors_long.weight" in keys.shapes:
            rope.update(rope_type="longrope", long_factor=keys.values("rope_factors_long.weight").tolist(),
                        short_factor=keys.values("rope_factors_short.weight").tolist())
        return {**config, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "rope_parameters": rope,
                "partial_rotary_factor": partial, "original_max_position_embeddings": original,
                "sliding_window": keys.get("attention.sliding_window") or None}

    @property
    def n_embd(self) -> int:
        return int(self._param("hidden_size", "n_embd"))

    @property
    def rope(self) -> dict:
        """Rope settings with the top-level keys llama.cpp's converter also looks in."""
        params = super().rope
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if params.get(key) is None and self.hparams.get(key) is not None:
                params[key] = self.hparams[key]
        return params

    @property
    def rope_dims(self) -> int:
        return int(float(self.rope.get("partial_rotary_factor") or 1.0) * self.n_embd) // self.n_head

    @property
    def context_length(self) -> int:
        return int(self._param("n_positions", "max_position_embeddings"))

    @property
    def original_context_length(self) -> int:
        value = self.rope.get("original_max_position_embeddings")
        if value is None:
            raise ConversionError("config.json has no original_max_position_embeddings, which Phi-3 needs")
        return int(value)

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        # Not the base's keys: llama.cpp's phi3 converter writes exactly these.
        writer.add_context_length(self.context_length)
        writer.add_rope_scaling_orig_ctx_len(self.original_context_length)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(int(self._param("intermediate_size")))
        writer.add_block_count(self.block_count)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(self._param("rms_norm_eps")))
        writer.add_rope_dimension_count(self.rope_dims)
        writer.add_rope_freq_base(float(self.rope.get("rope_theta") or 10000.0))
        writer.add_sliding_window(int(self.hparams.get("sliding_window") or 0))
        if self._rope_factors() is not None:
            writer.add_rope_scaling_attn_factors(self._attention_factor())

    def _rope_factors(self) -> tuple[list[float], list[float]] | None:
        """(short, long) LongRoPE factors, checked; None without long-context scaling."""
        rope = self.rope
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            kind = (rope.get("rope_type") or "default").lower()
            if kind not in ("default", *_LONGROPE_TYPES):
                raise ConversionError(f"rope scaling type {kind!r} is not supported for {self.checkpoint.architecture}")
            return None
        if not short:
            raise ConversionError("config.json's rope scaling has long_factor but no short_factor")
        half = self.rope_dims / 2
        if len(long) != half or len(short) != half:
            raise ConversionError(
                f"config.json's rope scaling factors must have {half:g} entries (half the rotary dimensions); "
                f"long_factor has {len(long)}, short_factor {len(short)}"
            )
        return [float(x) for x in short], [float(x) for x in long]

    def _attention_factor(self) -> float:
        kind = (self.rope.get("rope_type") or "").lower()
        scale = self.context_length / self.original_context_length
        if kind in _LONGROPE_TYPES:
            return math.sqrt(1 + math.log(scale) / math.log(self.original_context_length)) if scale > 1.0 else 1.0
        if kind == "yarn":
            return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        raise ConversionError(
            f"rope scaling type {kind or 'none'!r} with long/short factors is not supported for "
            f"{self.checkpoint.architecture} (expected longrope)"
        )

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        factors = self._rope_factors()
        if factors is None:
            return
        short, long = factors
        yield _tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG), np.asarray(long, dtype=np.float32)
        yield _tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT), np.asarray(short, dtype=np.float32)

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        if name.endswith("qkv_proj.weight"):
            head_dim = self.n_embd // self.n_head
            return ((self.n_head + 2 * self.n_head_kv) * head_dim, self.n_embd)
        return super().expected_shape(name, gguf_name)

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        required = [_tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD)]
        if not self.tied_embeddings:
            required.append(_tensor_name(gguf.MODEL_TENSOR.OUTPUT))
        for bid in range(self.block_count):
            required += [_tensor_name(gguf.MODEL_TENSOR.ATTN_QKV, bid), _tensor_name(gguf.MODEL_TENSOR.FFN_UP, bid)]
        missing = [n for n in required if n not in names]
        if missing:
            raise ConversionError(
                f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]} "
                "(Phi-3 checkpoints have fused qkv_proj and gate_up_proj)"
            )


def _tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"
