"""SentencePiece tokenizers saved as tokenizer.json only (transformers 5): byte-fallback BPE, ▁ for spaces.

transformers 5 saves a SentencePiece family's tokenizer (Gemma, Llama 2, Mistral v0.1,
Phi-3, TinyLlama) as a BPE `tokenizer.json` with byte fallback, and no `tokenizer.model`.
Such a tokenizer replaces spaces by "▁" (a normalizer `Replace`, or a `Metaspace`
pre-tokenizer) and merges over whole lines; the families differ in one thing, whether a
"▁" is put before the text (the dummy prefix of Llama 2, Mistral, Phi-3), or not (Gemma).
Each becomes the GGUF llama.cpp tokenizes the same way:

- no prefix: llama.cpp's BPE model ("gpt2") with its SentencePiece-style pre-tokenizer
  ("gemma4": spaces escaped as ▁, raw UTF-8, <0xXX> byte fallback), as llama.cpp's
  converter writes a Gemma 3 directory without tokenizer.model;
- a prefix: llama.cpp's SentencePiece model ("llama"), which adds the prefix itself. It
  merges the adjacent pair whose result has the highest score, so each token's score is
  minus the rank of the first merge that makes it: the BPE's own order. (llama.cpp's
  converter, via gguf's LlamaHfVocab, gives every token -1000, which makes llama.cpp merge
  left to right and tokenize differently from transformers.)

Data only, torch-free: reads the parsed tokenizer.json; vocab.py builds the GGUF vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SPACE = "\u2581"  # SentencePiece's visible space
# llama.cpp's pre-tokenizer for SentencePiece-style BPE (LLAMA_VOCAB_PRE_TYPE_GEMMA4).
SPM_BPE_PRE_TOKENIZER = "gemma4"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class UnsupportedSpmJson(ValueError):
    """A byte-fallback BPE tokenizer.json whose text handling llama.cpp cannot reproduce."""


@dataclass(frozen=True)
class SpmStyle:
    dummy_prefix: bool  # "▁" before the text (Llama 2, Mistral, Phi-3), or nothing (Gemma)


def spm_style(tokenizer: dict[str, Any]) -> SpmStyle | None:
    """How a byte-fallback BPE tokenizer.json handles spaces; None for any other tokenizer.

    Only the steps SentencePiece itself takes are accepted: spaces replaced by ▁, an optional
    ▁ before the text, and splits that cannot change the result. Anything else (NFKC, a
    Metaspace that splits into words...) would make llama.cpp tokenize differently.
    """
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    replaces = prefix = False
    for step in _steps(tokenizer.get("normalizer"), "normalizers"):
        kind = step.get("type")
        if kind == "Replace" and _pattern(step) == " " and step.get("content") == SPACE:
            replaces = True
        elif kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        else:
            raise UnsupportedSpmJson(f"its normalizer has a {kind} step")
    for step in _steps(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement", SPACE) == SPACE and not step.get("split", True):
            replaces = True
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space") else "never")
            prefix = prefix or scheme in ("always", "first")
        elif kind == "Split" and _pattern(step) == " " and replaces:
            continue  # after ' ' became ▁ there is no ' ' left to split at
        else:
            raise UnsupportedSpmJson(f"its pre-tokenizer has a {kind} step that splits the text")
    if not replaces:
        raise UnsupportedSpmJson("it does not replace spaces with ▁ as SentencePiece does")
    return SpmStyle(dummy_prefix=prefix)


def merge_scores(merges: list) -> dict[str, float]:
    """Each merged token's SentencePiece score: minus the rank of the first merge that makes it."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def is_byte_token(text: str) -> bool:
    return _BYTE_TOKEN.fullmatch(text) is not None


def _steps(section: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not section:
        return []
    if section.get("type") == "Sequence":
        return [step for item in section.get(key, []) for step in _steps(item, key)]
    return [section]


def _pattern(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern")
    return pattern.get("String") if isinstance(pattern, dict) else None
