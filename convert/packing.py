"""Packed batches and their loss: a batch is one row with no padding.

    PackedCollator()(examples) -> {input_ids, labels, shift_labels, position_ids}
    packed_loss(model, batch, num_items, chunk_tokens) -> (loss, outputs)

Positions restart at every example; transformers turns such position ids into
a block-diagonal attention mask (causal within an example, and its sliding
window, if any, counted from the example's own start), so no example sees
another. That holds for the eager and sdpa attention of every family
the converter supports (tests/test_finetune_families.py checks each one's
logits packed against alone); `attention_implementation` picks one that also
keeps the family's own attention math.

Layers that carry a state from token to token (the short convolutions of LFM2,
Mamba-2 in Granite 4, the gated DeltaNet of Qwen3.5 and Qwen3-Next) know nothing
of position ids: transformers' PyTorch code, the only one on a CPU, runs them
over the whole row, so an example would start from the state the previous one
left. For such a model (`carried_state`) every example goes through the model
alone, in a right-padded row of its own (`forward_pieces`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from convert import data as datamod


# A packed row goes through the model in chunks of whole examples of at most
# this many tokens (or one longer example): attention then costs the sum of the
# chunks' squares, not the row's square, and examples never attend to each
# other. Measured on 2 CPU cores, 8 examples (1,200 tokens) a step, max length
# 256: 206 tok/s in 512-token chunks, 199 in 256, 187 in 1,024 and 167 as one
# row, and the smaller chunks hold less memory for the backward pass.
PACKED_ROW_TOKENS = 512


class PackedCollator:
    """Concatenate a batch into one row: no padding at all.

    `position_ids` restart at 0 for every example, which is how transformers
    tells packed examples apart (each attends only to itself). `shift_labels`
    holds, at each position, the next token of the same example or
    IGNORE_INDEX: the targets, with nothing crossing an example's end.
    """

    def __call__(self, examples: Sequence[datamod.Example]) -> dict[str, torch.Tensor]:
        input_ids, labels, targets, positions = [], [], [], []
        for example in examples:
            input_ids.extend(example.input_ids)
            labels.extend(example.labels)
            targets.extend(example.labels[1:])
            targets.append(datamod.IGNORE_INDEX)
            positions.extend(range(len(example)))

        def row(values):
            return torch.tensor([values], dtype=torch.long)

        return {
            "input_ids": row(input_ids),
            "labels": row(labels),
            "shift_labels": row(targets),
            "position_ids": row(positions),
        }


def packed_loss(
    model,
    inputs: dict[str, torch.Tensor],
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
):
    """Cross-entropy over the trained positions only; logits are computed only there.

    The packed row goes through the model in chunks of whole examples of at
    most `chunk_tokens` tokens (one chunk when None): attention costs the sum
    of the chunks' squares instead of the whole row's square, and a chunk with
    nothing to train on is skipped. An example longer than the model's
    `length_sensitive_rope` limit goes through alone. A model whose layers carry a
    state across tokens (`carried_state`) gets each example in a row of its own
    (`forward_pieces`). Returns the summed loss
    divided by `num_items` (the trained tokens of the whole accumulated batch),
    or the mean when it is None, and the last chunk's model outputs.
    """
    targets = inputs["shift_labels"]
    total = torch.zeros((), device=targets.device)
    outputs = None
    config = getattr(getattr(model, "module", model), "config", None)
    for piece in forward_pieces(config, inputs, chunk_tokens):
        keep = piece["shift_labels"].ne(datamod.IGNORE_INDEX)
        if not keep.any():
            continue
        outputs = model(
            input_ids=piece["input_ids"], position_ids=piece["position_ids"], use_cache=False, logits_to_keep=keep
        )
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
        total = total + torch.nn.functional.cross_entropy(logits, piece["shift_labels"][keep], reduction="sum")
    divisor = num_items if num_items is not None else targets.ne(datamod.IGNORE_INDEX).sum().clamp(min=1)
    return total / divisor, outputs


def forward_pieces(
    config, inputs: dict[str, torch.Tensor], chunk_tokens: int | None, *, keep_order: bool = False
) -> list[dict[str, torch.Tensor]]:
    """The model inputs (input_ids, position_ids, shift_labels) of each forward pass over a packed
    row: slices of the row cut between examples (`chunk_bounds`), or, for a model whose layers
    carry a state across tokens, batches of one example per row, right-padded.

    Right padding is exact for those: every layer is causal, so the padding after an example
    cannot reach it, and its positions are not trained on. Examples share a batch while
    rows x longest stays within `chunk_tokens`, longest first so that similar lengths pad each
    other little (`keep_order` keeps the row's order, for a caller that lines the trained
    positions up with data of its own). Measured on 2 CPU cores: a padded batch of 8 examples
    runs 1.6-2x the tokens/s of the same examples one forward pass each.
    """
    alone_above = length_sensitive_rope(config)
    if carried_state(config) is None:
        return [
            {name: inputs[name][:, start:end] for name in ("input_ids", "position_ids", "shift_labels")}
            for start, end in chunk_bounds(inputs["position_ids"], chunk_tokens, alone_above)
        ]
    spans = chunk_bounds(inputs["position_ids"], None, 0)  # one span per example
    if not keep_order:
        spans.sort(key=lambda span: span[0] - span[1])
    return [_padded(inputs, group) for group in _batches(spans, chunk_tokens, alone_above)]


def _batches(spans: list[tuple[int, int]], chunk_tokens: int | None, alone_above: int | None) -> list[list[tuple[int, int]]]:
    """Examples grouped in their order so that rows x longest stays within `chunk_tokens`; an example
    longer than `alone_above` (its rope changes with the length) is a group of its own."""
    groups: list[list[tuple[int, int]]] = []
    for span in spans:
        length = span[1] - span[0]
        alone = alone_above is not None and length > alone_above
        current = groups[-1] if groups else None
        if current is not None and not alone and not current[0][2]:
            longest = max(length, max(e - s for s, e, _ in current))
            if chunk_tokens is None or longest * (len(current) + 1) <= chunk_tokens:
                current.append((*span, alone))
                continue
        groups.append([(*span, alone)])
    return [[(s, e) for s, e, _ in group] for group in groups]


def _padded(inputs: dict[str, torch.Tensor], spans: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One row per example, right-padded to the longest (token 0, never a target)."""
    longest = max(end - start for start, end in spans)
    ids = inputs["input_ids"].new_zeros((len(spans), longest))
    targets = inputs["shift_labels"].new_full((len(spans), longest), datamod.IGNORE_INDEX)
    for row, (start, end) in enumerate(spans):
        ids[row, : end - start] = inputs["input_ids"][0, start:end]
        targets[row, : end - start] = inputs["shift_labels"][0, start:end]
    positions = torch.arange(longest, device=ids.device).expand(len(spans), longest)
    return {"input_ids": ids, "position_ids": positions, "shift_labels": targets}


def chunk_bounds(
    position_ids: torch.Tensor, chunk_tokens: int | None, alone_above: int | None = None
) -> list[tuple[int, int]]:
    """[start, end) spans of a packed row, cut between examples, each at most `chunk_tokens` long
    (or a single example, if that is longer); an example longer than `alone_above` is a span of its own."""
    length = position_ids.shape[-1]
    if alone_above is None and (chunk_tokens is None or length <= chunk_tokens):
        return [(0, length)]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds, begin = [], 0
    for start, end in zip(starts, [*starts[1:], length]):  # each example's span
        alone = alone_above is not None and end - start > alone_above
        if start > begin and (alone or (chunk_tokens is not None and end - begin > chunk_tokens)):
            bounds.append((begin, start))
            begin = start
        if alone and end < length:
            bounds.append((start, end))
            begin = end
    bounds.append((begin, length))
    return bounds


# Words of the `layer_types` of layers whose output at a token depends on a state carried from
# the tokens before it, other than through attention: LFM2's "conv", Granite 4's "mamba" (which
# its transformers config renames "linear_attention"), Qwen3.5's and Qwen3-Next's
# "linear_attention" (gated DeltaNet), and the names other hybrids use for the same.
_STATEFUL_LAYER_WORDS = ("conv", "mamba", "linear_attention", "recurrent", "ssm", "rwkv", "deltanet")
# Families whose layers are (partly) recurrent, for configs that have no `layer_types`.
_STATEFUL_MODEL_TYPES = (
    "mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "bamba", "zamba", "zamba2", "nemotron_h",
    "granitemoehybrid", "rwkv", "recurrent_gemma", "xlstm",
)
# What the layers are called in their papers, for the training log.
_STATEFUL_KINDS = {
    "granitemoehybrid": "Mamba-2", "lfm2": "short-convolution", "lfm2_moe": "short-convolution",
    "qwen3_next": "gated DeltaNet", "qwen3_5_text": "gated DeltaNet", "qwen3_5_moe_text": "gated DeltaNet",
}


def carried_state(config) -> str | None:
    """Why this model's examples cannot share a forward pass, or None when they can.

    A packed row keeps examples apart only in attention (through the position ids);
    a convolution or recurrent layer would carry its state over from one example to
    the next (tests/test_finetune_families.py shows the leak on each such family).
    Decided by the config's `layer_types` where it has them, else by the model type.
    """
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None) or getattr(text_config, "layers_block_type", None)
    if layer_types:
        stateful = sorted({t for t in layer_types if any(w in str(t).lower() for w in _STATEFUL_LAYER_WORDS)})
    else:
        stateful = [text_config.model_type] if text_config.model_type in _STATEFUL_MODEL_TYPES else []
    if not stateful:
        return None
    kind = _STATEFUL_KINDS.get(text_config.model_type, "/".join(stateful))
    return f"its {kind} layers carry a state from token to token"


# Rope types whose frequencies transformers sets from the largest position id of each forward
# pass: longrope switches to its long factors past the original context (Phi-3.5, Phi-4-mini),
# dynamic NTK rescales past it. Packed, a short example would take the frequencies of a long one.
_LENGTH_SENSITIVE_ROPE = ("longrope", "dynamic")


def length_sensitive_rope(config) -> int | None:
    """The example length past which the model's rope frequencies change with the length (then
    such an example must go through the model alone), or None when they never do."""
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text_config, "rope_parameters", None) or {}
    by_layer_type = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    for parameters in by_layer_type:
        if parameters.get("rope_type") in _LENGTH_SENSITIVE_ROPE:
            return (
                parameters.get("original_max_position_embeddings")
                or getattr(text_config, "original_max_position_embeddings", None)
                or text_config.max_position_embeddings
            )
    return None


def attention_implementation(config) -> str | None:
    """The attention to load a model with for training and merging: None for transformers' default
    (sdpa where the family has it, else eager), or "eager" where sdpa would change the model.

    Soft-capped attention logits (Gemma 2; a Gemma 3 config that sets them) need eager attention:
    sdpa has no soft-cap, and transformers' sdpa path drops it without a word, so the adapter would
    be trained against other attention than llama.cpp runs. Eager and sdpa both take the packed
    block-diagonal mask, sliding windows included.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "attn_logit_softcapping", None):
        return "eager"
    return None
