"""LoRA adapter GGUFs for tests and benchmarks, written with the `gguf` package from chosen tensors,
and the merged model an adapter stands for (the base with W + scale * alpha/r * B A in F32).

Shapes follow llama.cpp's layout (ggml ne order; numpy shapes are reversed): for a base weight of
ne [n_in, n_out], lora_a is ne [n_in, r] (numpy (r, n_in)) and lora_b ne [r, n_out] (numpy (n_out, r)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf
from alpaca_chat.engine.adapter_check import BaseLayout


def random_pairs(layout: BaseLayout, names, *, rank: int = 8, std: float = 0.05, seed: int = 0) -> dict:
    """A random (lora_a, lora_b) pair in numpy shapes for each base weight in `names`."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for name in names:
        n_in, n_out = layout.tensors[name][:2]
        a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
        b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
        pairs[name] = (a, b)
    return pairs


def write_adapter(path: Path, architecture: str, pairs: dict, *, alpha: float | None = None,
                  general_type: str = "adapter", adapter_type: str = "lora", dtype=np.float32,
                  extra_tensors: dict | None = None, extra_kv: dict | None = None) -> Path:
    """Write an adapter GGUF: `pairs` maps a base tensor name to (lora_a, lora_b) in numpy shapes."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string(gguf.Keys.General.TYPE, general_type)
    writer.add_string(gguf.Keys.Adapter.TYPE, adapter_type)
    if alpha is not None:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, value)
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=dtype))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=dtype))
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def deltas(pairs: dict, *, alpha: float | None, scale: float = 1.0) -> dict:
    """What llama.cpp adds to each weight (numpy shape (n_out, n_in)): scale * alpha/r * B A."""
    out = {}
    for name, (a, b) in pairs.items():
        rank = a.shape[0]
        factor = scale * (alpha / rank if alpha else 1.0)
        out[name] = factor * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def write_merged(path: Path, base: Path, weight_deltas: dict, *, requantize: bool = False) -> Path:
    """A copy of the base GGUF whose weights in `weight_deltas` are dequantized, changed and stored in
    F32: the model an adapter stands for. Other tensors keep their type and bytes. `requantize` stores
    the changed weights in their original type instead (as a merged, quantized fine-tune: for speed
    comparisons; F32 is for exactness)."""
    reader = gguf.GGUFReader(str(base))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name in weight_deltas:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            merged = (w.astype(np.float64) + weight_deltas[t.name]).astype(np.float32)
            if requantize and t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(t.name, gguf.quants.quantize(merged, t.tensor_type), raw_dtype=t.tensor_type)
            else:
                writer.add_tensor(t.name, merged)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # the reader gives the byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
