"""Llama family: Llama 2/3, SmolLM, TinyLlama (and Mistral, which subclasses it).

Two things differ from the shared base:
- llama.cpp applies rotary embeddings to adjacent pairs of each head's
  dimensions, Hugging Face to its two halves, so q and k rows are permuted
  (per head, per KV head for k under GQA) to keep the same model;
- Llama 3.1's "llama3" rope scaling becomes a `rope_freqs` tensor of
  per-frequency divisors, computed from the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import gguf
import numpy as np

from alpaca_chat.errors import TrainingError
from convert.export.base import ArchModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register

# Llama 3.1 and 3.2's rope scaling settings besides the factor (tried first when reading a file back).
LLAMA3_SETTINGS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@register("LlamaForCausalLM")
class LlamaModel(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.LLAMA

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_vocab_size(int(self.hparams["vocab_size"]))
        writer.add_rope_dimension_count(self.head_dim)

    @property
    def head_dim(self) -> int:
        return int(self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.n_head)

    @classmethod
    def reads_gguf(cls, keys) -> bool:
        # Llama 2/3, SmolLM, TinyLlama, Mistral: transformers' reader drops Llama 3's and linear rope
        # scaling. A llama file with experts is Mixtral's (MixtralModel); subclasses with their own
        # architecture (Granite, SmolLM3) are read as the base says.
        return super().reads_gguf(keys) and (cls is not LlamaModel or not keys.get("expert_count"))

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return {**llama_config(keys), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}

    def modify_tensor(self, name: str, gguf_name: str, data: np.ndarray) -> np.ndarray:
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_rope_rows(data, self.n_head)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_rope_rows(data, self.n_head_kv)
        return data

    def moves_values_only(self, name: str, gguf_name: str) -> bool:
        # The q/k permutation only reorders rows; a subclass that computes values says so itself.
        return type(self).modify_tensor is LlamaModel.modify_tensor

    def extra_rope_types(self) -> tuple[str, ...]:
        return ("llama3",)

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        rope = self.rope
        if (rope.get("rope_type") or "").lower() == "llama3":
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            yield name, llama3_rope_factors(rope, self.head_dim)


def llama_config(keys) -> dict:
    """config.json of a llama-architecture file, Llama 3's rope scaling read from its rope_freqs."""
    config = {**decoder_config(keys), "rope_parameters": rope_parameters(keys),
              "attention_bias": "blk.0.attn_q.bias" in keys.shapes, "mlp_bias": False}
    if "rope_freqs.weight" in keys.shapes:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        config["rope_parameters"] = llama3_rope_from_factors(
            keys.values("rope_freqs.weight"), float(config["rope_parameters"]["rope_theta"]), head_dim)
    return config


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The "llama3" rope settings whose factors (llama3_rope_factors) are `factors`.

    The factor is the largest; Llama 3.1/3.2's other settings are tried first. Otherwise the
    smoothed frequencies, linear in 1/wavelength, give the rest (at an original length of 8192:
    every such triple with the same line gives the same factors)."""
    factor = float(np.max(factors))
    candidates = [{**LLAMA3_SETTINGS, "factor": factor}]
    fitted = _fit_llama3_smoothing(factors, theta, head_dim, factor)
    if fitted is not None:
        candidates.append({**fitted, "factor": factor})
    for settings in candidates:
        rope = {"rope_type": "llama3", "rope_theta": theta, **settings}
        if np.allclose(llama3_rope_factors(rope, head_dim), factors, rtol=1e-6, atol=0):
            return rope
    raise TrainingError("base model: the GGUF's rope_freqs are not Llama 3's rope scaling; cannot read them back")


def _fit_llama3_smoothing(factors: np.ndarray, theta: float, head_dim: int, factor: float) -> dict | None:
    """smooth = old_context / wavelen / (high - low) - low / (high - low), from 1 / f = 1/factor + smooth (1 - 1/factor)."""
    if factor <= 1.0:
        return None
    wavelens = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smoothed = (factors > 1.0) & (factors < np.float32(factor))
    if np.count_nonzero(smoothed) < 2:
        return None
    smooth = (1.0 / factors[smoothed].astype(np.float64) - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(1.0 / wavelens[smoothed], smooth, 1)  # smooth = a / wavelen - b
    old_context = LLAMA3_SETTINGS["original_max_position_embeddings"]
    low = -intercept * old_context / slope
    high = low + old_context / slope
    return {"low_freq_factor": float(f"{low:.6g}"), "high_freq_factor": float(f"{high:.6g}"),
            "original_max_position_embeddings": old_context}


def permute_rope_rows(data: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from (half, half) to interleaved pairs; shape is kept."""
    rows = data.shape[0]
    return (
        data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:])
        .swapaxes(1, 2)
        .reshape(data.shape)
    )


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (long wavelengths slowed by `factor`).

    Every step is float32, in the order llama.cpp's converter computes it with torch (a Python
    scalar divided by a tensor is torch's reciprocal-then-multiply), so that the file is
    byte-identical to its: the same formula in float64 moves a few values by one float32 ULP.
    The one step that cannot be mirrored exactly is torch's float32 power (SIMD, within one
    ULP); the correctly rounded power used here agrees with it on Llama 3.1 and 3.2's settings.
    """
    f32 = np.float32
    base = float(rope.get("rope_theta") or 10000.0)
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    powers = (np.float64(base) ** exponents.astype(np.float64)).astype(f32)
    freqs = _rdiv(1.0, powers)
    factors = []
    for freq in freqs:
        wavelen = _rdiv(2 * math.pi, freq)
        if wavelen < high_freq_wavelen:
            factors.append(f32(1.0))
        elif wavelen > low_freq_wavelen:
            factors.append(f32(factor))
        else:
            smooth = (_rdiv(old_context, wavelen) - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
            factors.append(_rdiv(1.0, (f32(1.0) - smooth) / f32(factor) + smooth))
    return np.asarray(factors, dtype=f32)


def _rdiv(scalar: float, value):
    """`scalar / value` as torch computes it for a float32 tensor: 1 / value, then times scalar."""
    return (np.float32(1.0) / value) * np.float32(scalar)
