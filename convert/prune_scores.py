"""Importance scores from activations on calibration text, for structured pruning.

    chunks = calibration_chunks(tokenizer, text, max_length=256, max_tokens=4096)
    scores = collect_scores(model, chunks)

- a layer: Block Influence (ShortGPT), 1 - cos(layer input, layer output), averaged over
  tokens: a layer that barely turns the residual stream does little;
- an FFN neuron: the mean magnitude of its activation, the input of down_proj (Minitron);
- an attention head: the mean L2 norm of its output, the input of o_proj, per head (Minitron).

Forward hooks only: the model runs as it always does, in float32, without gradients. The
scores are plain numpy arrays, written into pruning.json as they are.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BUILTIN_CALIBRATION = Path(__file__).with_name("builtin_data") / "calibration_prune.txt"


@dataclass
class Scores:
    layers: np.ndarray  # [n_layers] Block Influence
    neurons: list[np.ndarray]  # per layer, [intermediate_size]
    heads: list[np.ndarray]  # per layer, [num_attention_heads]
    tokens: int = 0

    def as_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "layers_block_influence": _rounded(self.layers),
            "ffn_neurons_mean_abs_activation": [_rounded(n) for n in self.neurons],
            "heads_mean_output_norm": [_rounded(h) for h in self.heads],
        }


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


def calibration_text(path: Path | None) -> tuple[str, str]:
    """(text, a name for it): the file given, else the built-in text (never the evaluation text)."""
    path = path or BUILTIN_CALIBRATION
    return path.read_text(encoding="utf-8"), str(path if path != BUILTIN_CALIBRATION else "built-in")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_chunks(tokenizer, text: str, *, max_length: int, max_tokens: int) -> list[list[int]]:
    """The text's token ids in consecutive chunks of at most `max_length`, `max_tokens` in all."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    bos = tokenizer.bos_token_id
    step = max_length - (1 if bos is not None else 0)
    chunks = []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        if len(chunk) >= 2:
            chunks.append(([bos] if bos is not None else []) + chunk)
    return chunks


@dataclass
class _Accumulator:
    n_layers: int
    bi: np.ndarray = field(init=False)
    neurons: list = field(init=False)
    heads: list = field(init=False)
    tokens: int = 0
    layer_input: dict = field(default_factory=dict)

    def __post_init__(self):
        self.bi = np.zeros(self.n_layers, dtype=np.float64)
        self.neurons = [None] * self.n_layers
        self.heads = [None] * self.n_layers


def _add(slot: list, i: int, value: torch.Tensor) -> None:
    value = value.double().numpy()
    slot[i] = value if slot[i] is None else slot[i] + value


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers")
    return layers


@torch.no_grad()
def collect_scores(model, chunks: list[list[int]], head_dim: int) -> Scores:
    layers = decoder_layers(model)
    acc = _Accumulator(len(layers))
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(_layer_in(acc, i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(_layer_out(acc, i)))
        hooks.append(_ffn_input_module(layer).register_forward_pre_hook(_ffn_in(acc, i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(_heads_in(acc, i, head_dim)))
    try:
        model.eval()
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]), use_cache=False)
            acc.tokens += len(chunk)
    finally:
        for hook in hooks:
            hook.remove()
    n = max(acc.tokens, 1)
    return Scores(
        layers=acc.bi / n,
        neurons=[v / n for v in acc.neurons],
        heads=[v / n for v in acc.heads],
        tokens=acc.tokens,
    )


def _ffn_input_module(layer):
    return layer.mlp.down_proj


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_in(acc: _Accumulator, i: int):
    def hook(module, args, kwargs):
        acc.layer_input[i] = _hidden(args, kwargs).detach()

    return hook


def _layer_out(acc: _Accumulator, i: int):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        before = acc.layer_input.pop(i)
        cos = torch.nn.functional.cosine_similarity(before.float(), out.float(), dim=-1)
        acc.bi[i] += float((1.0 - cos).sum())

    return hook


def _ffn_in(acc: _Accumulator, i: int):
    def hook(module, args):
        x = args[0]
        _add(acc.neurons, i, x.abs().reshape(-1, x.shape[-1]).sum(0))

    return hook


def _heads_in(acc: _Accumulator, i: int, head_dim: int):
    def hook(module, args):
        x = args[0]
        per_head = x.reshape(-1, x.shape[-1] // head_dim, head_dim).norm(dim=-1)
        _add(acc.heads, i, per_head.sum(0))

    return hook
