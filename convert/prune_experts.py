"""Expert pruning of a mixture of experts (Mixtral, Qwen3-MoE): drop each layer's least-routed experts.

    result = prune_experts(checkpoint, out, keep=4)

The model runs on calibration text (the same built-in text as `prune`, never the evaluation
text); a hook on every layer's router counts how often each expert is among the token's top-k,
and sums the router probability it gets (the tie-break). Each layer keeps its `keep` most-routed
experts, in their order, with the router rows that choose them, so every layer has the same
number of experts (config.json holds one count) and llama.cpp's expert tensors stay uniform.
The router's softmax then runs over the kept experts only, as it would had the model been
trained with them. pruning.json records the counts and what went; the output is staged and
swapped in whole (convert/atomic.py).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_chat.errors import UsageError
from convert.atomic import atomic_directory

# model_type -> the config key holding the number of experts per layer
EXPERT_COUNT_KEYS = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts"}


@dataclass(frozen=True)
class ExpertsResult:
    out: Path
    params_before: int
    params_after: int
    kept: dict[int, list[int]]  # layer -> kept expert indices


def check_keep(config, keep: int) -> tuple[str, int]:
    """(the config key, the old count); a one-line UsageError for a model or a count that cannot be."""
    model_type = getattr(config, "model_type", None)
    key = EXPERT_COUNT_KEYS.get(model_type)
    if key is None:
        raise UsageError(f"--experts-keep: {model_type!r} is not a mixture of experts prune knows "
                         f"(supported: {', '.join(sorted(EXPERT_COUNT_KEYS))})")
    old, used = int(getattr(config, key)), int(config.num_experts_per_tok)
    if not used <= keep < old:
        raise UsageError(f"--experts-keep must be at least the {used} experts each token uses and below the "
                         f"{old} the model has, not {keep}")
    return key, old


def prune_experts(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], keep: int, *,
                  calibration: Path | None = None, calibration_tokens: int = 4096, max_length: int = 256) -> ExpertsResult:
    import torch

    from convert import model_loading, prune, prune_scores

    out = Path(out)
    path = model_loading.resolve_base(str(checkpoint))
    config = model_loading.load_model_config(path)
    key, old = check_keep(config, keep)
    if calibration is not None and not Path(calibration).is_file():
        raise UsageError(f"--calibration: no such file: {calibration}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a directory")
    text, calibration_name = prune_scores.calibration_text(calibration)
    tokenizer = model_loading.load_tokenizer(path)
    model = model_loading.load_model(path, "cpu").eval()
    chunks = prune_scores.calibration_chunks(tokenizer, text, max_length=max_length, max_tokens=calibration_tokens)
    if not chunks:
        raise UsageError(f"--calibration: {calibration_name} holds no text to score with")
    counts, mass = routing_counts(model, chunks, old)
    kept = {layer: kept_experts(counts[layer], mass[layer], keep) for layer in range(len(counts))}
    before = _params(model)
    with torch.no_grad():
        state = _pruned_state(model.state_dict(), kept)
    new_config = copy.deepcopy(model.config)
    setattr(new_config, key, keep)
    after = sum(int(np.prod(t.shape)) for name, t in state.items() if not _tied_head(name, new_config))
    record = {
        "source": str(path),
        "model_type": config.model_type,
        "request": {"experts_keep": keep, "calibration": str(calibration) if calibration else None,
                    "calibration_tokens": calibration_tokens, "max_length": max_length},
        "calibration": {"name": calibration_name, "sha256": prune_scores.text_sha256(text),
                        "tokens": sum(len(c) for c in chunks)},
        "params": {"before": before, "after": after},
        "experts": {"before": old, "after": keep, "per_token": int(config.num_experts_per_tok)},
        "kept_experts": {str(k): v for k, v in kept.items()},
        "dropped_experts": {str(k): sorted(set(range(old)) - set(v)) for k, v in kept.items()},
        "scores": {"routed_tokens": [c.tolist() for c in counts],
                   "router_probability": [[float(f"{x:.6g}") for x in m] for m in mass]},
    }
    with atomic_directory(out) as stage:
        prune._save(new_config, state, stage, prune._save_dtype(config))
        prune._copy_tokenizer(path, stage)
        (stage / prune.PRUNING_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return ExpertsResult(out, before, after, kept)


def routing_counts(model, chunks: list[list[int]], n_experts: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer: how many calibration tokens chose each expert, and the router probability each got."""
    import torch

    routers = [m for name, m in model.named_modules() if name.endswith(".mlp.gate") and hasattr(m, "top_k")]
    if not routers:
        raise UsageError("--experts-keep: found no expert router (mlp.gate) in the model")
    counts = [np.zeros(n_experts, dtype=np.int64) for _ in routers]
    mass = [np.zeros(n_experts, dtype=np.float64) for _ in routers]

    def hook(layer):
        def record(module, inputs, output):
            router_logits, _, indices = output  # transformers' TopKRouter: (logits, scores, indices)
            counts[layer] += np.bincount(indices.reshape(-1).numpy(), minlength=n_experts)
            mass[layer] += router_logits.float().softmax(-1).sum(0).double().numpy()
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
    finally:
        for h in handles:
            h.remove()
    return counts, mass


def kept_experts(counts: np.ndarray, mass: np.ndarray, keep: int) -> list[int]:
    """The `keep` most-routed experts (ties: more router probability, then the lower index), in order."""
    order = np.lexsort((np.arange(len(counts)), -mass, -counts))
    return sorted(order[:keep].tolist())


def _pruned_state(state: dict, kept: dict[int, list[int]]) -> dict:
    """Every tensor with an expert axis (the router's rows, the stacked experts' first axis) cut to the kept ones."""
    import torch

    from convert.prune_families import split_layer_name

    out = {}
    for name, tensor in state.items():
        where = split_layer_name(name)
        if where is not None and (where[1] == "mlp.gate.weight" or where[1].startswith("mlp.experts.")):
            tensor = tensor.index_select(0, torch.as_tensor(kept[where[0]])).contiguous()
        out[name] = tensor
    return out


def _tied_head(name: str, config) -> bool:
    return name == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters(): tied weights once
