"""Gemma 4's tokenizer as llama.cpp's own "gemma4" tokenizer model, from tokenizer.json.

Gemma 4 ships its SentencePiece tokenizer as a byte-fallback BPE `tokenizer.json` (spaces
become ▁, no dummy prefix, merges over whole lines). llama.cpp has a tokenizer model for it,
"gemma4": BPE by merge rank with that pre-tokenizer, so its converter writes no
`tokenizer.ggml.pre`, and neither do we. As its converter writes it:
- the tokens as tokenizer.json spells them (▁ kept), every score -1000 (the BPE ranks by merges);
- <0xXX> byte pieces are BYTE; the tokenizer's special tokens CONTROL (matched whole, never
  printed); the seven markers a chat parser must see in the output (channel, tool call, tool
  response, the string escape) USER_DEFINED, so that llama.cpp prints them;
- BOS always added (llama.cpp forces it for this tokenizer too), no space prefix.
The special tokens are those tokenizer_config.json names (bos/eos/unk/pad/mask and Gemma 4's
`sot_token`, `eot_token`... and `extra_special_tokens`), which is what llama.cpp's converter
gets from transformers' `all_special_ids`, plus any added token tokenizer.json marks special:
transformers matches those whole, so llama.cpp must too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from convert.export.vocab import TokenizerError, looks_special
from convert.export.vocab_spm_json import SPACE, UnsupportedSpmJson, is_byte_token, spm_style

T = gguf.TokenType
TOKENIZER_MODEL = "gemma4"
# Markers llama.cpp's converter makes USER_DEFINED so that they appear in the generated text.
VISIBLE_MARKERS = frozenset(
    ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>')
)
_NOT_TOKEN_KEYS = ("add_", "clean_up")


def add_gemma4_vocab(writer: gguf.GGUFWriter, path: Path, config: dict[str, Any], chat_template: str | None) -> None:
    """Write the checkpoint's tokenizer (tokenizer.json) as llama.cpp's gemma4 tokenizer."""
    tokenizer = _read_json(path / "tokenizer.json", required=True)
    _check_style(path, tokenizer)
    ids = {i: text for text, i in tokenizer["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer.get("added_tokens", [])}
    for token_id, entry in added.items():
        ids[token_id] = entry["content"]
    n_vocab = int(config.get("vocab_size") or max(ids) + 1)
    if max(ids) >= n_vocab:
        raise TokenizerError(
            f"the tokenizer has token id {max(ids)} but the model's vocab_size is {n_vocab}: "
            "the embeddings have no row for it"
        )
    special = _special_ids(path, ids, added)

    tokens, types = [], []
    for i in range(n_vocab):
        text = ids.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(T.UNUSED)
            continue
        kind = T.NORMAL
        if text in VISIBLE_MARKERS:
            kind = T.USER_DEFINED
        elif i in special:
            kind = T.CONTROL
        elif i in added:  # an added token that is not special: matched whole in the raw text
            kind, text = T.USER_DEFINED, text.replace(SPACE, " ")
        elif is_byte_token(text):
            kind = T.BYTE
        tokens.append(text.encode("utf-8"))
        types.append(kind)

    vocab = gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab)
    if not vocab.merges:
        raise TokenizerError(f"{path / 'tokenizer.json'} has no BPE merges")
    if chat_template is not None:
        vocab.chat_template = chat_template
    vocab.add_special_token["bos"] = True
    vocab.add_special_token.setdefault("eos", False)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * n_vocab)
    writer.add_token_types(types)
    vocab.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)


def _check_style(path: Path, tokenizer: dict[str, Any]) -> None:
    try:
        style = spm_style(tokenizer)
    except UnsupportedSpmJson as exc:
        raise TokenizerError(
            f"{path / 'tokenizer.json'}: llama.cpp's gemma4 tokenizer would split differently: {exc}"
        ) from None
    if style is None or style.dummy_prefix:
        raise TokenizerError(
            f"{path / 'tokenizer.json'} is not Gemma 4's tokenizer (a byte-fallback BPE that writes spaces "
            "as ▁ with no leading ▁): a tokenizer from another model family?"
        )


def _special_ids(path: Path, ids: dict[int, str], added: dict[int, dict]) -> set[int]:
    """Ids of the tokens tokenizer_config.json names, and of the added tokens marked special."""
    by_text = {text: i for i, text in ids.items()}
    config = _read_json(path / "tokenizer_config.json", required=False) or {}
    named: list[str] = []
    for key, value in config.items():
        if key.endswith("_token") and not key.startswith(_NOT_TOKEN_KEYS):
            named.append(_content(value))
        elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
            named.extend(_content(v) for v in value)
    found = {by_text[text] for text in named if text in by_text}
    found |= {i for i, entry in added.items() if entry.get("special") or looks_special(entry["content"])}
    return found


def _content(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise TokenizerError(f"no {path.name} in {path.parent}: Gemma 4's tokenizer is read from tokenizer.json")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from None
