"""`alpaca-convert prune`: a smaller checkpoint of the same family, by structured pruning.

    result = prune(checkpoint, out, PruneRequest(drop_layers=4, ffn_keep=0.75))

Whole layers, FFN neurons and attention heads (or KV groups) go, ranked by importance
from activations on calibration text (convert/prune_scores.py). Only structured pruning
makes llama.cpp faster: ggml has no sparse weight types, so zeroed weights buy nothing.
The output is a standard checkpoint of the same family with uniform widths (every layer
keeps the same number of neurons and heads, its own best ones), so transformers loads it
and `alpaca-convert export` converts it; FFN widths stay multiples of `ffn_multiple` (256:
K-quants take 256-wide rows whole). What each family's tensors mean for a head, a neuron
or a layer is `convert/prune_families.py`. pruning.json records what went and the scores.
The output is built in a directory beside OUT and swapped in whole when complete
(convert/atomic.py's atomic_directory): OUT is never half written.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alpaca_chat.errors import TrainingError, UsageError
from convert import prune_families as fam
from convert.atomic import atomic_directory
from convert.prune_scores import Scores

PRUNING_FILE = "pruning.json"
PREFERENCES = ("width", "depth")


@dataclass(frozen=True)
class PruneRequest:
    """What to remove; help text is the flags'."""

    drop_layers: int = 0
    ffn_keep: float | None = None
    heads_keep: float | None = None
    target_params: int | None = None
    prefer: str = "width"
    ffn_multiple: int = 256
    calibration: Path | None = None
    calibration_tokens: int = 4096
    max_length: int = 256


@dataclass(frozen=True)
class Plan:
    """What stays: layer indices, and the new widths every kept layer has."""

    kept_layers: tuple[int, ...]
    shape: fam.Shape

    def as_json(self, old: fam.Shape, n_layers: int) -> dict:
        return {
            "kept_layers": list(self.kept_layers),
            "dropped_layers": [i for i in range(n_layers) if i not in self.kept_layers],
            "before": asdict(old),
            "after": asdict(self.shape),
        }


@dataclass(frozen=True)
class PruneResult:
    out: Path
    params_before: int
    params_after: int
    plan: Plan


# -- checking the request -----------------------------------------------------------------


def family_of(config) -> fam.PruneFamily:
    model_type = getattr(config, "model_type", None)
    family = fam.FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(fam.FAMILIES))
        raise UsageError(f"prune: model type {model_type!r} is not supported (supported: {supported})")
    return family


def model_shape(config) -> fam.Shape:
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    return fam.Shape(n_heads=n_heads, n_kv=n_kv, head_dim=int(head_dim), ffn=int(config.intermediate_size))


def check_request(request: PruneRequest, config, family: fam.PruneFamily) -> None:
    """Every refusal before any work: a one-line UsageError."""
    n_layers = int(config.num_hidden_layers)
    explicit = request.drop_layers or request.ffn_keep is not None or request.heads_keep is not None
    if request.target_params is not None and explicit:
        raise UsageError("--target-params chooses what to prune: give it alone, without --drop-layers/--ffn-keep/--heads-keep")
    if request.target_params is None and not explicit:
        raise UsageError("prune: say what to remove: --drop-layers, --ffn-keep, --heads-keep or --target-params")
    if not 0 <= request.drop_layers < n_layers:
        raise UsageError(f"--drop-layers must be between 0 and {n_layers - 1} (the model has {n_layers} layers), "
                         f"not {request.drop_layers}")
    for flag, value in (("--ffn-keep", request.ffn_keep), ("--heads-keep", request.heads_keep)):
        if value is not None and not 0 < value <= 1:
            raise UsageError(f"{flag} is the fraction kept: above 0 and at most 1, not {value}")
    if request.ffn_multiple < 1:
        raise UsageError(f"--ffn-multiple must be a positive number of neurons, not {request.ffn_multiple}")
    if request.target_params is not None and request.target_params <= 0:
        raise UsageError(f"--target-params must be a positive number of parameters, not {request.target_params}")
    if request.prefer not in PREFERENCES:
        raise UsageError(f"--prefer: use width or depth, not {request.prefer!r}")
    if request.calibration_tokens < 16 or request.max_length < 16:
        raise UsageError("--calibration-tokens and --max-length must be at least 16")
    if request.calibration is not None and not Path(request.calibration).is_file():
        raise UsageError(f"--calibration: no such file: {request.calibration}")
    old = model_shape(config)
    if request.ffn_keep is not None:
        ffn_width(old.ffn, request.ffn_keep, request.ffn_multiple)
    if request.heads_keep is not None:
        if not family.heads:
            raise UsageError(f"--heads-keep: {config.model_type}'s llama.cpp architecture derives head_dim from "
                             "hidden_size / heads, so its heads cannot be pruned (prune layers or FFN neurons)")
        head_counts(old, request.heads_keep)


def ffn_width(ffn: int, keep: float, multiple: int) -> int:
    if ffn < multiple:
        raise UsageError(f"--ffn-keep: intermediate_size {ffn} is smaller than --ffn-multiple {multiple}")
    width = int(round(ffn * keep / multiple)) * multiple
    return min(max(width, multiple), ffn)


def head_counts(old: fam.Shape, keep: float) -> tuple[int, int]:
    """(query heads, KV heads) after pruning: whole KV groups when they divide, else heads within each group."""
    group = old.n_heads // old.n_kv
    n_heads = int(round(old.n_heads * keep))
    if n_heads < 1:
        raise UsageError(f"--heads-keep {keep} leaves no attention head of {old.n_heads}")
    if n_heads % group == 0 and (old.n_kv > 1 or n_heads == old.n_heads):
        return n_heads, n_heads // group
    if n_heads % old.n_kv == 0:
        return n_heads, old.n_kv
    raise UsageError(
        f"--heads-keep {keep}: {n_heads} of {old.n_heads} heads cannot be divided among {old.n_kv} KV heads "
        f"(groups of {group}); keep a number of heads that is a multiple of {group} or of {old.n_kv}"
    )


# -- planning -------------------------------------------------------------------------


def drop_order(scores: Scores, n_drop: int) -> tuple[int, ...]:
    """The layers kept after dropping the `n_drop` of least Block Influence (ties: the later layer goes)."""
    n_layers = len(scores.layers)
    order = np.lexsort((-np.arange(n_layers), scores.layers))  # by score, then the later index first
    dropped = set(order[:n_drop].tolist())
    return tuple(i for i in range(n_layers) if i not in dropped)


def plan_for(request: PruneRequest, config, scores: Scores, family: fam.PruneFamily,
             drop_layers: int | None = None, ffn: int | None = None) -> Plan:
    old = model_shape(config)
    n_drop = request.drop_layers if drop_layers is None else drop_layers
    if ffn is None:
        ffn = old.ffn if request.ffn_keep is None else ffn_width(old.ffn, request.ffn_keep, request.ffn_multiple)
    n_heads, n_kv = (old.n_heads, old.n_kv) if request.heads_keep is None else head_counts(old, request.heads_keep)
    kept = drop_order(scores, n_drop)
    return Plan(kept, fam.Shape(n_heads=n_heads, n_kv=n_kv, head_dim=old.head_dim, ffn=ffn))


def layer_cut(plan: Plan, old: fam.Shape, scores: Scores, layer: int) -> fam.LayerCut:
    """Which heads and neurons layer `layer` keeps: its own highest-scoring ones, in their order."""
    new = plan.shape
    neurons = _top(scores.neurons[layer], new.ffn)
    heads_scores = scores.heads[layer]
    group = old.n_heads // old.n_kv
    if new.n_kv < old.n_kv:  # whole KV groups
        kv = _top(heads_scores.reshape(old.n_kv, group).sum(1), new.n_kv)
        heads = (kv[:, None] * group + np.arange(group)[None, :]).reshape(-1)
    else:  # the best heads of every group
        per_group = new.n_heads // old.n_kv
        kv = np.arange(old.n_kv)
        heads = np.concatenate([g * group + _top(heads_scores[g * group:(g + 1) * group], per_group) for g in kv])
    return fam.LayerCut(heads=heads, kv_heads=kv, neurons=neurons)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values (ties: the lower index), sorted."""
    order = np.lexsort((np.arange(len(values)), -values))
    return np.sort(order[:k])


def count_params(named_shapes: dict[str, tuple[int, ...]], plan: Plan | None, old: fam.Shape,
                 family: fam.PruneFamily, scores: Scores | None = None) -> int:
    """Parameters of the model `plan` leaves (tied weights counted once: pass distinct parameters)."""
    total = 0
    for name, shape in named_shapes.items():
        where = fam.split_layer_name(name)
        if plan is None or where is None:
            total += int(np.prod(shape))
            continue
        layer, rest = where
        if layer not in plan.kept_layers:
            continue
        rows, columns = fam.tensor_cut(family, rest, shape, old, _shape_only_cut(plan, old))
        total += int(np.prod(fam.cut_shape(shape, rows, columns)))
    return total


def _shape_only_cut(plan: Plan, old: fam.Shape) -> fam.LayerCut:
    group = old.n_heads // old.n_kv
    kv = np.arange(plan.shape.n_kv)
    heads = np.arange(plan.shape.n_heads) if plan.shape.n_kv < old.n_kv else np.concatenate(
        [g * group + np.arange(plan.shape.n_heads // old.n_kv) for g in range(old.n_kv)])
    return fam.LayerCut(heads=heads, kv_heads=kv, neurons=np.arange(plan.shape.ffn))


def plan_for_target(request: PruneRequest, config, scores: Scores, family: fam.PruneFamily,
                    named_shapes: dict[str, tuple[int, ...]]) -> Plan:
    """The plan nearest `target_params` from below: width first (FFN neurons, then layers) or depth first."""
    old = model_shape(config)
    n_layers = int(config.num_hidden_layers)
    multiple = request.ffn_multiple
    if old.ffn < multiple:
        raise UsageError(f"--target-params: intermediate_size {old.ffn} is smaller than --ffn-multiple {multiple}")
    widths = [old.ffn] + list(range((old.ffn - 1) // multiple * multiple, multiple - 1, -multiple))
    grid = [(d, w) for d in range(n_layers) for w in widths] if request.prefer == "width" else \
        [(d, w) for w in widths for d in range(n_layers)]
    for n_drop, width in grid:
        plan = plan_for(request, config, scores, family, drop_layers=n_drop, ffn=width)
        if count_params(named_shapes, plan, old, family) <= request.target_params:
            return plan
    smallest = plan_for(request, config, scores, family, drop_layers=n_layers - 1, ffn=multiple)
    raise UsageError(f"--target-params {request.target_params}: the smallest pruned model has "
                     f"{count_params(named_shapes, smallest, old, family):,} parameters")


# -- the command ---------------------------------------------------------------------


def prune(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], request: PruneRequest) -> PruneResult:
    import torch

    from convert import model_loading, prune_scores

    out = Path(out)
    path = model_loading.resolve_base(str(checkpoint))
    config = model_loading.load_model_config(path)
    family = family_of(config)
    check_request(request, config, family)
    _check_out(out)
    text, calibration_name = prune_scores.calibration_text(request.calibration)
    tokenizer = model_loading.load_tokenizer(path)
    model = model_loading.load_model(path, "cpu")
    old = model_shape(model.config)
    chunks = prune_scores.calibration_chunks(tokenizer, text, max_length=request.max_length,
                                             max_tokens=request.calibration_tokens)
    if not chunks:
        raise UsageError(f"--calibration: {calibration_name} holds no text to score with")
    scores = prune_scores.collect_scores(model, chunks, old.head_dim)
    named_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if request.target_params is not None:
        plan = plan_for_target(request, model.config, scores, family, named_shapes)
    else:
        plan = plan_for(request, model.config, scores, family)
    before = count_params(named_shapes, None, old, family)
    after = count_params(named_shapes, plan, old, family)
    record = {
        "source": str(path),
        "model_type": model.config.model_type,
        "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()},
        "calibration": {"name": calibration_name, "sha256": prune_scores.text_sha256(text), "tokens": scores.tokens},
        "params": {"before": before, "after": after},
        **plan.as_json(old, len(scores.layers)),
        "scores": scores.as_json(),
    }
    with torch.no_grad():
        state = _pruned_state(model, plan, old, scores, family, record)
        new_config = _pruned_config(model.config, plan, old)
        with atomic_directory(out) as stage:
            _save(new_config, state, stage, _save_dtype(config))
            _copy_tokenizer(path, stage)
            (stage / PRUNING_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return PruneResult(out=out, params_before=before, params_after=after, plan=plan)


def _pruned_state(model, plan: Plan, old: fam.Shape, scores: Scores, family, record: dict) -> dict:
    import torch

    renumber = {old_i: new_i for new_i, old_i in enumerate(plan.kept_layers)}
    cuts = {i: layer_cut(plan, old, scores, i) for i in plan.kept_layers}
    record["kept_per_layer"] = {
        str(i): {"heads": cut.heads.tolist(), "kv_heads": cut.kv_heads.tolist(),
                 "ffn_neurons_dropped": sorted(set(range(old.ffn)) - set(cut.neurons.tolist()))}
        for i, cut in cuts.items()
    }
    state = {}
    for name, tensor in model.state_dict().items():
        where = fam.split_layer_name(name)
        if where is None:
            state[name] = tensor
            continue
        layer, rest = where
        if layer not in renumber:
            continue
        rows, columns = fam.tensor_cut(family, rest, tuple(tensor.shape), old, cuts[layer])
        if rows is not None:
            tensor = tensor.index_select(0, torch.as_tensor(rows))
        if columns is not None:
            tensor = tensor.index_select(1, torch.as_tensor(columns))
        state[f"{fam.LAYERS_PREFIX}{renumber[layer]}.{rest}"] = tensor.contiguous()
    return state


def _pruned_config(config, plan: Plan, old: fam.Shape):
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(plan.kept_layers)
    new.intermediate_size = plan.shape.ffn
    if (plan.shape.n_heads, plan.shape.n_kv) != (old.n_heads, old.n_kv):
        new.num_attention_heads = plan.shape.n_heads
        new.num_key_value_heads = plan.shape.n_kv
        new.head_dim = old.head_dim
    for key in fam.PER_LAYER_KEYS:
        values = getattr(new, key, None)
        if isinstance(values, list) and len(values) == int(config.num_hidden_layers):
            setattr(new, key, [values[i] for i in plan.kept_layers])
    return new


def _save(config, state: dict, stage: Path, dtype) -> None:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise TrainingError(f"prune: the pruned weights do not fit the pruned model (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.to(dtype).save_pretrained(stage, safe_serialization=True)


def _save_dtype(config):
    import torch

    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, torch.dtype):
        return saved
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(saved), torch.float32)


def _copy_tokenizer(source: Path, stage: Path) -> None:
    from convert.merge import copy_tokenizer

    copy_tokenizer(source, stage)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a directory")
