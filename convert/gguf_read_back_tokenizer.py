"""A GGUF's tokenizer written back as the tokenizer files a checkpoint has (convert/gguf_read_back.py).

Tokenization is what llama.cpp runs on the file, so it is rebuilt from what llama.cpp reads:
- byte-level BPE (`tokenizer.ggml.model` "gpt2"): transformers' GGUF tokenizer reader builds the
  vocabulary and merges (by tokenizer kind, whatever the architecture); the text is split as the
  file's `tokenizer.ggml.pre` names it, by our exporter's own table (convert/export/pretokenizers.py),
  so exporting the checkpoint names the same split. transformers' table lacks some names (glm4);
- SentencePiece ("llama") of Llama, Mistral, Gemma and Phi-3: transformers' reader rebuilds these as
  their models' tokenizers (with builders of its own for Gemma and Phi-3), the tokenizer.json
  transformers 5 saves for them;
- other SentencePiece ("llama") files: a SentencePiece model (`tokenizer.model`) of type BPE with the file's
  pieces, scores and token types, and its dummy-prefix setting: llama.cpp merges by those scores as
  SentencePiece's BPE does. transformers' reader rebuilds this kind without its scores or BOS setting.
- Gemma 4's "gemma4" (BPE over SentencePiece pieces, by the file's merges): tokenizer.json as
  Gemma 4 ships it (spaces become ▁, byte fallback, no dummy prefix);
other kinds are refused in one line. The chat template, the special tokens and
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

READABLE_KINDS = ("gpt2", "llama", "gemma4")
# Architectures whose SentencePiece files transformers' GGUF reader rebuilds as their models'
# tokenizers (Llama's; its own builders for Gemma's spaces and merge order and Phi-3's prefix):
# a tokenizer.json, as transformers 5 saves these models.
_TRANSFORMERS_SENTENCEPIECE = ("llama", "gemma", "gemma2", "gemma3", "phi3")
SPACE = "\u2581"
_CONTROL, _USER_DEFINED = 3, 4


def check_readable(keys: GgufKeys, gguf_name: str) -> None:
    """Refuse, before anything is written, a tokenizer that cannot be rebuilt exactly."""
    kind = keys.raw("tokenizer.ggml.model")
    if kind == "llama" and _unknown_id(keys) is None:
        kind = "SentencePiece without an unknown token"  # SentencePiece models need one
    if kind not in READABLE_KINDS:
        raise TrainingError(
            f"base model: {gguf_name}'s {kind!r} tokenizer cannot be read back; "
            "give a Hugging Face checkpoint directory instead"
        )


def save_tokenizer(gguf_path: Path, keys: GgufKeys, family: type[ArchModel], staging: Path) -> None:
    kind = keys.raw("tokenizer.ggml.model")
    if kind == "gpt2":
        _save_through_transformers(gguf_path, keys, staging, _pre_tokenizer(keys, family))
    elif kind == "llama" and keys.arch in _TRANSFORMERS_SENTENCEPIECE:
        _save_through_transformers(gguf_path, keys, staging)
    elif kind == "gemma4":
        _save_gemma4(keys, staging)
    else:
        _save_sentencepiece(keys, staging)


def _save_through_transformers(gguf_path: Path, keys: GgufKeys, staging: Path, pre_tokenizer=None) -> None:
    """transformers' GGUF tokenizer reader's tokenizer, splitting text with `pre_tokenizer` if given."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if pre_tokenizer is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer
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
    for field, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        value = keys.raw(f"tokenizer.ggml.{key}")
        setattr(model.trainer_spec, field, -1 if value is None else int(value))
    model.trainer_spec.unk_id = _unknown_id(keys)
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = _space_prefix(keys)
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    (staging / "tokenizer.model").write_bytes(model.SerializeToString())
    # SentencePiece never matches a control piece in text; llama.cpp does (<|im_start|>): added tokens.
    added = {str(i): {"content": token, "special": kind == _CONTROL, "normalized": False, "lstrip": False,
                      "rstrip": False, "single_word": False}
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (_CONTROL, _USER_DEFINED)}
    _write_tokenizer_config(keys, staging, {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": _space_prefix(keys),
                                           "legacy": False, "added_tokens_decoder": added})


def _save_gemma4(keys: GgufKeys, staging: Path) -> None:
    """tokenizer.json in Gemma 4's own shape, from the file's pieces, merges and token types."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = keys.raw("tokenizer.ggml.tokens")
    types = keys.raw("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [_split_merge(merge, vocab) for merge in keys.raw("tokenizer.ggml.merges") or []]
    special = _special_tokens(keys)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=special.get("unk_token"), fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    bos = special.get("bos_token")
    if bos is not None and keys.raw("tokenizer.ggml.add_bos_token"):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(staging)
    _write_tokenizer_config(keys, staging, {})


def _split_merge(merge: str, vocab: dict[str, int]) -> tuple[str, str]:
    """A merge "LEFT RIGHT" as its pair; where a piece holds a space itself, the split whose pieces
    and whose result are all tokens."""
    for at in [i for i, c in enumerate(merge) if c == " "]:
        left, right = merge[:at], merge[at + 1 :]
        if left in vocab and right in vocab and left + right in vocab:
            return left, right
    raise TrainingError(f"base model: the GGUF's merge {merge!r} does not join two of its tokens")


def _special_tokens(keys: GgufKeys) -> dict[str, str]:
    """bos_token, eos_token... as tokenizer_config.json names them: the tokens' texts."""
    tokens = keys.raw("tokenizer.ggml.tokens")
    return {f"{role}_token": tokens[token_id] for role, token_id in keys.special_token_ids().items()}


def _unknown_id(keys: GgufKeys) -> int | None:
    """The unknown token: the file's id for it, else its one piece of type UNKNOWN."""
    value = keys.raw("tokenizer.ggml.unknown_token_id")
    if value is not None:
        return int(value)
    types = keys.raw("tokenizer.ggml.token_type") or []
    return types.index(2) if 2 in types else None


def _space_prefix(keys: GgufKeys) -> bool:
    value = keys.raw("tokenizer.ggml.add_space_prefix")
    return True if value is None else bool(value)  # llama.cpp's default for a SentencePiece vocabulary


def _write_tokenizer_config(keys: GgufKeys, staging: Path, extra: dict[str, Any]) -> None:
    """Special tokens, the chat template and BOS/EOS adding as the file says, over what is there."""
    path = staging / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.update(_special_tokens(keys))
    for name in ("add_bos_token", "add_eos_token"):
        value = keys.raw(f"tokenizer.ggml.{name}")
        if value is not None:
            config[name] = bool(value)
    template = keys.raw("tokenizer.chat_template")
    if template is not None and not (staging / "chat_template.jinja").is_file():
        config["chat_template"] = template
    config.update(extra)
    path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
