"""Which llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) matches a tokenizer.json.

A byte-level BPE tokenizer first splits text into words (digits, letters,
punctuation, whitespace runs) and only then applies merges. llama.cpp
re-implements a fixed set of these splitting rules, each under a name. We read
the `pre_tokenizer` section of tokenizer.json, reduce it to its steps, and
look the steps up in the table below. A tokenizer whose steps are not in the
table is refused (llama.cpp would silently split text differently from the
model's own tokenizer); `--pre-tokenizer NAME` overrides the lookup.

Data only: add a row when a new family of tokenizers is supported.
"""

from __future__ import annotations

from typing import Any

# The GPT-2 regex, which ByteLevel(use_regex=true) applies.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3 (tiktoken cl100k-like): digits in groups of up to three.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 / Qwen2.5: the Llama 3 regex with single digits.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 / Qwen3.6: the Qwen2 regex with combining marks (\p{M}) kept inside words (llama.cpp's "qwen35").
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-4o (tiktoken o200k; Phi-4-mini): case-aware words with an optional contraction, digits in threes.
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Tekken (Mistral-Nemo and later Mistral tokenizers): case-aware words, single digits.
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

Step = tuple[str, ...]

# Normalized pre-tokenizer steps -> llama.cpp's name for the same splitting.
PRE_TOKENIZERS: dict[tuple[Step, ...], str] = {
    (("regex", GPT2_REGEX), ("bytes",)): "gpt-2",
    (("digits",), ("regex", GPT2_REGEX), ("bytes",)): "smollm",  # SmolLM, StarCoder: single digits
    (("regex", LLAMA3_REGEX), ("bytes",)): "llama-bpe",
    (("regex", QWEN2_REGEX), ("bytes",)): "qwen2",
    (("regex", QWEN35_REGEX), ("bytes",)): "qwen35",
    (("regex", TEKKEN_REGEX), ("bytes",)): "tekken",  # Mistral-Nemo
    (("regex", GPT4O_REGEX), ("bytes",)): "gpt-4o",  # Phi-4-mini
}

KNOWN_NAMES = tuple(sorted(set(PRE_TOKENIZERS.values())))


class UnknownPreTokenizer(ValueError):
    """The tokenizer.json splits text in a way no table row describes."""


def pre_tokenizer_steps(pre_tokenizer: dict[str, Any] | None) -> tuple[Step, ...]:
    """tokenizer.json's `pre_tokenizer` as a tuple of steps, e.g. (("digits",), ("regex", R), ("bytes",))."""
    if not pre_tokenizer:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        steps: list[Step] = []
        for item in pre_tokenizer.get("pretokenizers", []):
            steps.extend(pre_tokenizer_steps(item))
        return tuple(steps)
    if kind == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space"):
            return (("prefix-space",), ("regex", GPT2_REGEX), ("bytes",))
        if pre_tokenizer.get("use_regex", True):
            return (("regex", GPT2_REGEX), ("bytes",))
        return (("bytes",),)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex is None or pre_tokenizer.get("invert") or pre_tokenizer.get("behavior") != "Isolated":
            return (("split", repr(pre_tokenizer)),)
        return (("regex", regex),)
    if kind == "Digits":
        return (("digits",),) if pre_tokenizer.get("individual_digits") else (("digit-runs",),)
    return ((str(kind),),)


def detect_pre_tokenizer(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for this pre-tokenizer, or UnknownPreTokenizer."""
    steps = pre_tokenizer_steps(pre_tokenizer)
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        described = ", ".join(step[0] for step in steps) or "none"
        raise UnknownPreTokenizer(
            f"the tokenizer's pre-tokenizer ({described}) is not one llama.cpp is known to match; "
            f"pass --pre-tokenizer NAME if you know it (known: {', '.join(KNOWN_NAMES)})"
        )
    return name
