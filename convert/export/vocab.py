"""The tokenizer, as GGUF metadata: tokens, their types and scores, merges, special tokens.

Three kinds of tokenizer are read:
- SentencePiece, from `tokenizer.model` (Llama 2, Mistral, TinyLlama): llama.cpp's "llama" model;
- byte-level BPE, from `tokenizer.json` (GPT-2 style: SmolLM, Llama 3, Qwen2): llama.cpp's
  "gpt2" model, with the pre-tokenizer named by `pretokenizers.py`;
- SentencePiece saved as a byte-fallback BPE `tokenizer.json` only (transformers 5): see
  `vocab_spm_json.py` for which llama.cpp model each becomes.

Merges, special token ids, add_bos/add_eos and the chat template come from
gguf's `SpecialVocab`, which reads tokenizer.json, tokenizer_config.json,
chat_template.jinja and config.json the way llama.cpp's converter does.
add_bos/add_eos are always written: when the tokenizer files say nothing we
write what transformers' tokenizer does, so llama.cpp never falls back to
its own per-model default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.pretokenizers import UnknownPreTokenizer, detect_pre_tokenizer
from convert.export.vocab_spm_json import (
    SPACE,
    SPM_BPE_PRE_TOKENIZER,
    UnsupportedSpmJson,
    is_byte_token,
    merge_scores,
    spm_style,
)


class TokenizerError(ConversionError):
    """The checkpoint has no tokenizer we can convert, or an unreadable one."""


T = gguf.TokenType


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None  # SentencePiece only
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if chat_template is not None:
            self.special.chat_template = chat_template
        self.special.add_to_gguf(writer, quiet=True)


def load_vocab(path: Path, config: dict[str, Any], *, pre_tokenizer: str | None = None) -> Vocab:
    """The checkpoint's tokenizer: tokenizer.model if present (as llama.cpp prefers), else tokenizer.json."""
    if (path / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(path, config)
    elif (path / "tokenizer.json").is_file():
        vocab = _bpe_vocab(path, config, pre_tokenizer)
    else:
        raise TokenizerError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")
    _set_add_special_defaults(vocab, path)
    return vocab


# -- byte-level BPE (tokenizer.json) ----------------------------------------------


def _bpe_vocab(path: Path, config: dict[str, Any], pre_tokenizer: str | None) -> Vocab:
    tokenizer = _read_json(path / "tokenizer.json")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(
            f"{path / 'tokenizer.json'}: a {model.get('type') or 'unknown'} tokenizer; "
            "only byte-level BPE (or a SentencePiece tokenizer.model) can be converted"
        )
    try:
        style = spm_style(tokenizer)
    except UnsupportedSpmJson as exc:
        raise TokenizerError(
            f"{path / 'tokenizer.json'} is a SentencePiece-style BPE tokenizer; tokenizer.model is needed "
            f"to convert this one, as llama.cpp would not reproduce its text handling: {exc}"
        ) from None
    if style is not None and style.dummy_prefix:
        return spm_json_vocab(path, config, tokenizer)
    if pre_tokenizer is None and style is not None:
        pre_tokenizer = SPM_BPE_PRE_TOKENIZER
    elif pre_tokenizer is None:
        try:
            pre_tokenizer = detect_pre_tokenizer(tokenizer.get("pre_tokenizer"))
        except UnknownPreTokenizer as exc:
            raise TokenizerError(str(exc)) from None

    ids, added, n_vocab = _token_ids(path, tokenizer, config)
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = ids.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(T.UNUSED)
        elif i in added:
            token_type, text = _added_token_type(added[i], text)
            tokens.append(text.encode("utf-8"))
            types.append(token_type)
        else:
            tokens.append(text.encode("utf-8"))
            types.append(T.NORMAL)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise TokenizerError(f"{path / 'tokenizer.json'} has no BPE merges")
    return Vocab("gpt2", pre_tokenizer, tokens, types, None, special)


def _token_ids(path: Path, tokenizer: dict, config: dict[str, Any]) -> tuple[dict[int, str], dict[int, dict], int]:
    """id -> text (the model's vocabulary, then its added tokens), the added tokens, the vocabulary size."""
    ids: dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    for token_id, entry in added.items():
        ids[token_id] = entry["content"]
    n_vocab = config.get("vocab_size") or max(ids) + 1
    if max(ids) >= n_vocab:
        raise TokenizerError(
            f"the tokenizer has token id {max(ids)} but the model's vocab_size is {n_vocab}: "
            "the embeddings have no row for it"
        )
    return ids, added, n_vocab


def _added_token_type(entry: dict, text: str) -> tuple[int, str]:
    """An added token's type, and its text as llama.cpp matches it (user-defined ones pre-normalized)."""
    if entry.get("special") or looks_special(text):
        return T.CONTROL, text
    # llama.cpp matches user-defined tokens in the raw text: a ▁ in one stands for a space.
    return T.USER_DEFINED, text.replace(SPACE, " ")


def spm_json_vocab(path: Path, config: dict[str, Any], tokenizer: dict) -> Vocab:
    """A SentencePiece-style BPE as llama.cpp's SentencePiece model, scored by merge rank (see
    vocab_spm_json.py): with a dummy prefix, which llama.cpp adds itself, or without one for a family
    whose export writes `add_space_prefix` false (ERNIE 4.5: llama.cpp's BPE reading would add a BOS)."""
    ids, added, n_vocab = _token_ids(path, tokenizer, config)
    model = tokenizer["model"]
    merge_score = merge_scores(model.get("merges") or [])
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i, text in ids.items():
        if i in added and text != model.get("unk_token"):
            types[i], text = _added_token_type(added[i], text)
            scores[i] = -1000.0
        elif text == model.get("unk_token"):
            types[i], scores[i] = T.UNKNOWN, 0.0
        elif is_byte_token(text):
            types[i], scores[i] = T.BYTE, 0.0
        else:
            types[i], scores[i] = T.NORMAL, merge_score.get(text, 0.0)
        tokens[i] = text.encode("utf-8")
    return Vocab("llama", "default", tokens, types, scores, gguf.SpecialVocab(path, n_vocab=n_vocab))


def looks_special(text: str) -> bool:
    """Added tokens some checkpoints forget to mark special: <|...|> and friends.

    llama.cpp treats control tokens as atomic and never prints them; an
    unmarked <|im_end|> would be printed and would not stop generation.
    """
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")  # Gemma's, DeepSeek-Coder's
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))  # Gemma's reserved tokens
    )


# -- SentencePiece (tokenizer.model) ----------------------------------------------


def _sentencepiece_vocab(path: Path, config: dict[str, Any]) -> Vocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise TokenizerError(
            "the sentencepiece package is needed for tokenizer.model (pip install sentencepiece)"
        ) from None
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path / "tokenizer.model"))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"cannot read {path / 'tokenizer.model'}: {exc}") from None
    n_pieces = processor.vocab_size()
    n_vocab = config.get("vocab_size") or n_pieces

    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    for i in range(min(n_pieces, n_vocab)):
        tokens[i] = processor.IdToPiece(i).encode("utf-8")
        scores[i] = processor.GetScore(i)
        types[i] = _piece_type(processor, i)

    # Tokens added on top of the SentencePiece model (chat markers, padding...).
    for token_id, text, special in _added_tokens(path):
        if token_id >= n_vocab:
            continue
        if special or looks_special(text):
            types[token_id] = T.CONTROL
        else:
            text = text.replace(SPACE, " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[token_id] = T.USER_DEFINED
        tokens[token_id] = text.encode("utf-8")
        scores[token_id] = -1000.0
    special_vocab = gguf.SpecialVocab(path, n_vocab=n_vocab)
    return Vocab("llama", "default", tokens, types, scores, special_vocab)


def _piece_type(processor, i: int) -> int:
    if processor.IsUnknown(i):
        return T.UNKNOWN
    if processor.IsControl(i):
        return T.CONTROL
    if processor.IsUnused(i):
        return T.UNUSED
    if processor.IsByte(i):
        return T.BYTE
    return T.NORMAL


def _added_tokens(path: Path) -> list[tuple[int, str, bool]]:
    """(id, text, special) from added_tokens.json, tokenizer_config.json and tokenizer.json."""
    found: dict[int, tuple[str, bool]] = {}
    added_json = path / "added_tokens.json"
    if added_json.is_file():
        for text, token_id in _read_json(added_json).items():
            found[int(token_id)] = (text, False)
    config_json = path / "tokenizer_config.json"
    if config_json.is_file():
        for token_id, entry in (_read_json(config_json).get("added_tokens_decoder") or {}).items():
            found[int(token_id)] = (entry["content"], bool(entry.get("special")))
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        for entry in _read_json(tokenizer_json).get("added_tokens", []):
            found[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    return [(i, text, special) for i, (text, special) in sorted(found.items())]


# -- add_bos / add_eos --------------------------------------------------------------


def _set_add_special_defaults(vocab: Vocab, path: Path) -> None:
    """Make add_bos/add_eos explicit, as transformers' tokenizer would behave."""
    added = vocab.special.add_special_token
    if "bos" in added and "eos" in added:
        return
    post = (_read_json(path / "tokenizer.json").get("post_processor") if (path / "tokenizer.json").is_file() else None)
    if post:
        # A TemplateProcessing that SpecialVocab found nothing in adds no BOS/EOS.
        single = _template_single(post)
        added.setdefault("bos", bool(single) and "SpecialToken" in single[0])
        added.setdefault("eos", len(single) > 1 and "SpecialToken" in single[-1])
    elif vocab.model == "llama":
        # transformers' LlamaTokenizer defaults: <s> before, nothing after.
        added.setdefault("bos", True)
        added.setdefault("eos", False)
    else:
        added.setdefault("bos", False)
        added.setdefault("eos", False)


def _template_single(post: dict) -> list[dict]:
    for processor in post.get("processors", [post]):
        if processor.get("type") == "TemplateProcessing":
            return processor.get("single", [])
    return []


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
