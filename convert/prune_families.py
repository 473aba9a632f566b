"""What structured pruning must know about each family: which tensors form a head, an FFN neuron, a layer.

Data apart from logic (as `convert/export/` keeps tensor-name maps): one `PruneFamily` per
transformers `model_type`. `convert/prune.py` scores and plans; the functions here turn a
plan into row/column selections of each tensor of a decoder layer, the same for every
family but for what the table says:

- `fused_qkv` / `fused_gate_up`: Phi-3 keeps q, k and v in one `qkv_proj` (rows: q heads,
  then k heads, then v heads) and gate and up in one `gate_up_proj` (rows: gate, then up);
- `qk_norm`: "head" when q_norm/k_norm weigh one head_dim (Qwen3, Gemma 3: shared by every
  head, nothing to cut), "projection" when they span the whole projection (OLMo 2: cut with
  the heads);
- `heads`: whether the family may lose heads. Pruning heads keeps head_dim, so config.json
  must say head_dim explicitly, and llama.cpp must take a head_dim that is not
  hidden_size / heads. Its granite and phi3 architectures derive head_dim; qwen2 and olmo2
  read it but expect attn_q to be hidden_size wide (checked when the model loads);

Which layers slide (`layer_types`) is sliced with the layers; the exporter writes the
pattern per layer whenever it is not llama.cpp's default for that depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PruneFamily:
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qk_norm: str | None = None  # None, "head" or "projection"
    heads: bool = True


FAMILIES: dict[str, PruneFamily] = {
    "llama": PruneFamily(),
    "mistral": PruneFamily(),
    "qwen2": PruneFamily(heads=False),
    "qwen3": PruneFamily(qk_norm="head"),
    "gemma2": PruneFamily(),
    "gemma3_text": PruneFamily(qk_norm="head"),
    "phi3": PruneFamily(fused_qkv=True, fused_gate_up=True, heads=False),
    "granite": PruneFamily(heads=False),
    "olmo2": PruneFamily(qk_norm="projection", heads=False),
}

LAYERS_PREFIX = "model.layers."
# Lists in config.json with one entry per layer: sliced with the layers.
PER_LAYER_KEYS = ("layer_types",)


@dataclass(frozen=True)
class Shape:
    """The attention and FFN geometry of a model (before or after pruning)."""

    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int


@dataclass(frozen=True)
class LayerCut:
    """What one layer keeps: query heads, KV heads and FFN neurons (sorted indices into the old layer)."""

    heads: np.ndarray
    kv_heads: np.ndarray
    neurons: np.ndarray


def _rows(heads: np.ndarray, head_dim: int, offset: int = 0) -> np.ndarray:
    return (offset + heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def tensor_cut(family: PruneFamily, name: str, shape: tuple[int, ...], old: Shape, cut: LayerCut):
    """(rows, columns) to keep of a layer tensor called `name` (within its layer), None for all."""
    hd = old.head_dim
    q_rows, k_rows = _rows(cut.heads, hd), _rows(cut.kv_heads, hd)
    module = name.rsplit(".", 1)[0]
    if module.endswith("qkv_proj"):  # fused: q heads, then k heads, then v heads
        q_size, kv_size = old.n_heads * hd, old.n_kv * hd
        return np.concatenate([q_rows, q_size + k_rows, q_size + kv_size + k_rows]), None
    if module.endswith("gate_up_proj"):  # fused: gate, then up
        return np.concatenate([cut.neurons, old.ffn + cut.neurons]), None
    if module.endswith(("q_norm", "k_norm")) and family.qk_norm == "head":
        return None, None  # one head_dim, shared by every head
    if module.endswith(("q_proj", "q_norm")):
        return q_rows, None
    if module.endswith(("k_proj", "v_proj", "k_norm")):
        return k_rows, None
    if module.endswith("o_proj"):
        return None, (q_rows if len(shape) == 2 else None)
    if module.endswith(("gate_proj", "up_proj")):
        return cut.neurons, None
    if module.endswith("down_proj"):
        return None, (cut.neurons if len(shape) == 2 else None)
    return None, None


def cut_shape(shape: tuple[int, ...], rows, columns) -> tuple[int, ...]:
    new = list(shape)
    if rows is not None:
        new[0] = len(rows)
    if columns is not None:
        new[1] = len(columns)
    return tuple(new)


def split_layer_name(name: str) -> tuple[int, str] | None:
    """('model.layers.3.mlp.up_proj.weight') -> (3, 'mlp.up_proj.weight'); None outside the layers."""
    if not name.startswith(LAYERS_PREFIX):
        return None
    index, rest = name[len(LAYERS_PREFIX):].split(".", 1)
    return int(index), rest
