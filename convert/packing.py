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
    `length_sensitive_rope` limit goes through alone. Returns the summed loss
    divided by `num_items` (the trained tokens of the whole accumulated batch),
    or the mean when it is None, and the last chunk's model outputs.
    """
    targets = inputs["shift_labels"]
    total = torch.zeros((), device=targets.device)
    outputs = None
    alone_above = length_sensitive_rope(getattr(getattr(model, "module", model), "config", None))
    for start, end in chunk_bounds(inputs["position_ids"], chunk_tokens, alone_above):
        keep = targets[:, start:end].ne(datamod.IGNORE_INDEX)
        if not keep.any():
            continue
        outputs = model(
            input_ids=inputs["input_ids"][:, start:end],
            position_ids=inputs["position_ids"][:, start:end],
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
        total = total + torch.nn.functional.cross_entropy(logits, targets[:, start:end][keep], reduction="sum")
    divisor = num_items if num_items is not None else targets.ne(datamod.IGNORE_INDEX).sum().clamp(min=1)
    return total / divisor, outputs


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
