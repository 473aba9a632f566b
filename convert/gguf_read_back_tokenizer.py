"""A GGUF's tokenizer written back as the tokenizer files a checkpoint has (convert/gguf_read_back.py).

Tokenization is what llama.cpp runs on the file, so it is rebuilt from what llama.cpp reads:
- byte-level BPE (`tokenizer.ggml.model` "gpt2"): transformers' GGUF tokenizer reader builds the
  vocabulary and merges (by tokenizer kind, whatever the architecture); the text is split as the
  file's `tokenizer.ggml.pre` names it, by our exporter's own table (convert/export/pretokenizers.py),
  so exporting the checkpoint names the same split. transformers' table lacks some names (glm4);
- SentencePiece ("llama"): a SentencePiece model (`tokenizer.model`) of type BPE with the file's
  pieces, scores and token types, and its dummy-prefix setting: llama.cpp merges by those scores as
  SentencePiece's BPE does. transformers' reader rebuilds this kind without its scores or BOS setting.
Other kinds (Gemma 4's "gemma4") are refused in one line. The chat template, the special tokens and
whether BOS/EOS are added go into tokenizer_config.json, as the file says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpaca_chat.errors import TrainingError

if TYPE_CHECKING:
    from convert.export.base import ArchModel
    from convert.export.gguf_keys import GgufKeys

READABLE_KINDS = ("gpt2", "llama")


def check_readable(keys: GgufKeys, gguf_name: str) -> None:
    """Refuse, before anything is written, a tokenizer that cannot be rebuilt exactly."""
    kind = keys.raw("tokenizer.ggml.model")
    if kind not in READABLE_KINDS:
        raise TrainingError(
            f"base model: {gguf_name}'s {kind!r} tokenizer cannot be read back; "
            "give a Hugging Face checkpoint directory instead"
        )


def save_tokenizer(gguf_path: Path, keys: GgufKeys, family: type[ArchModel], staging: Path) -> None:
    if keys.raw("tokenizer.ggml.model") == "gpt2":
        _save_byte_level(gguf_path, keys, family, staging)
    else:
        _save_sentencepiece(keys, staging)


def _save_byte_level(gguf_path: Path, keys: GgufKeys, family: type[ArchModel], staging: Path) -> None:
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = _pre_tokenizer(keys, family)
    tokenizer.save_pretrained(staging)
    _write_tokenizer_config(keys, staging, {})


def _pre_tokenizer(keys: GgufKeys, family: type[ArchModel]):
    """The tokenizers pre-tokenizer our exporter would name as the file's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    from convert.export.pretokenizers import PRE_TOKENIZERS

    name = keys.raw("tokenizer.ggml.pre")
    ours = {alias: base for base, alias in family.pre_tokenizer_names.items()}.get(name, name)
    steps = next((steps for steps, known in PRE_TOKENIZERS.items() if known == ours), None)
    if steps is None:
        raise TrainingError(f"base model: the GGUF's pre-tokenizer {name!r} cannot be read back")
    built = {
        "regex": lambda step: pre_tokenizers.Split(Regex(step[1]), behavior="isolated"),
        "bytes": lambda step: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        "digits": lambda step: pre_tokenizers.Digits(individual_digits=True),
    }
    return pre_tokenizers.Sequence([built[step[0]](step) for step in steps])


def _save_sentencepiece(keys: GgufKeys, staging: Path) -> None:
    """tokenizer.model: the file's pieces as a SentencePiece BPE model (token types share numbers)."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    tokens = keys.raw("tokenizer.ggml.tokens")
    scores = keys.raw("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = keys.raw("tokenizer.ggml.token_type") or [1] * len(tokens)
    model = sp.ModelProto()
    model.trainer_spec.model_type = sp.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = 6 in types
    for field, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                       ("pad_id", "padding_token_id")):
        value = keys.raw(f"tokenizer.ggml.{key}")
        setattr(model.trainer_spec, field, -1 if value is None else int(value))
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = _space_prefix(keys)
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    (staging / "tokenizer.model").write_bytes(model.SerializeToString())
    _write_tokenizer_config(keys, staging, {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": _space_prefix(keys),
                                           "legacy": False})


def _space_prefix(keys: GgufKeys) -> bool:
    value = keys.raw("tokenizer.ggml.add_space_prefix")
    return True if value is None else bool(value)  # llama.cpp's default for a SentencePiece vocabulary


def _write_tokenizer_config(keys: GgufKeys, staging: Path, extra: dict[str, Any]) -> None:
    """Special tokens, the chat template and BOS/EOS adding as the file says, over what is there."""
    path = staging / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokens = keys.raw("tokenizer.ggml.tokens")
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        value = keys.raw(f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = tokens[int(value)]
    for name in ("add_bos_token", "add_eos_token"):
        value = keys.raw(f"tokenizer.ggml.{name}")
        if value is not None:
            config[name] = bool(value)
    template = keys.raw("tokenizer.chat_template")
    if template is not None and not (staging / "chat_template.jinja").is_file():
        config["chat_template"] = template
    config.update(extra)
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
