"""A GGUF as the base of a fine-tune: dequantized once into a cached Hugging Face checkpoint.

`--base` takes what `alpaca-chat --model` takes (a GGUF path, a registry name
such as `smollm2-135m`, a hub GGUF reference) besides a checkpoint directory.
transformers' GGUF loader dequantizes the file (convert/model_loading.py's
`load_gguf`); its weights go into a fresh model of the same class, saved as safetensors with the tokenizer (its chat
template included) and the generation config, under the user's cache
directory, keyed by the file's size and a hash of its first and last MiB.
The next run finds it and loads nothing.

`PROVENANCE_FILE` beside the weights records that the base was a quantized
file, and which; merge copies it into the merged checkpoint and export writes
it into the GGUF's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from convert.atomic import atomic_directory, recover_directory

PROVENANCE_FILE = "alpaca_base.json"
CACHE_ENV = "ALPACA_CONVERT_CACHE"


def is_gguf_spec(spec: str) -> bool:
    """Whether `--base` names a GGUF (a file, a registry name or a hub GGUF reference), not a checkpoint."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return False
    if path.is_file() or spec.lower().endswith(".gguf"):
        return True
    from alpaca_chat.models import load_registry

    registry = load_registry()
    return spec in registry or spec.lower() in registry or ":" in spec


def checkpoint_from_gguf(spec: str) -> Path:
    """The cached checkpoint of a GGUF base, dequantizing it the first time."""
    from alpaca_chat import gguf_check, models

    resolved = models.resolve_model(spec)
    gguf_check.check_gguf(resolved.path)  # a corrupt file fails here, in one line, before transformers reads it
    identity = file_identity(resolved.path)
    target = cache_dir() / identity["key"]
    recover_directory(target)  # a run killed while swapping it in left the old one aside
    if _cached(target, identity):
        return target
    _dequantize(resolved.path, target, {**identity, "source": resolved.name, "quant": resolved.quant})
    return target


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    home = os.environ.get("ALPACA_CHAT_HOME")
    if home:
        return Path(home).expanduser() / "cache" / "gguf-bases"
    import platformdirs

    return Path(platformdirs.user_cache_dir("alpaca-chat", appauthor=False)) / "gguf-bases"


def file_identity(path: Path) -> dict:
    """Size and sha256 of the first and last MiB (the header, and the end of the tensor data)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    digest = h.hexdigest()
    return {"gguf": path.name, "size": size, "sha256_head_tail": digest, "key": f"{path.stem}-{digest[:16]}"}


def read_provenance(checkpoint: Path) -> dict | None:
    try:
        return json.loads((Path(checkpoint) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached(target: Path, identity: dict) -> bool:
    recorded = read_provenance(target)
    return bool(recorded) and recorded.get("sha256_head_tail") == identity["sha256_head_tail"] and any(
        target.glob("*.safetensors")
    )


def _dequantize(gguf: Path, target: Path, provenance: dict) -> None:
    """Read the GGUF as a plain model, save it as a checkpoint beside its tokenizer and provenance,
    swapped in whole (convert/atomic.py). transformers' GGUF reader does the families it knows
    (convert/model_loading.py); our exporter, run backwards, the others (convert/gguf_read_back.py)."""
    from convert import gguf_base_check, gguf_read_back

    with atomic_directory(target) as staging:
        if gguf_read_back.can_read_back(gguf):
            gguf_read_back.read_back(gguf, staging)
        else:
            _save_through_transformers(gguf, staging)
        _drop_tokens_without_embeddings(staging, _embedding_rows(staging))
        gguf_base_check.check_base(gguf, staging)  # the same model as the file, or one line
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def _save_through_transformers(gguf: Path, staging: Path) -> None:
    from convert.model_loading import load_gguf  # torch: only when a GGUF is dequantized

    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _embedding_rows(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def _drop_tokens_without_embeddings(checkpoint: Path, n_vocab: int) -> None:
    """Remove added tokens the model has no embedding row for from the saved tokenizer.

    transformers' GGUF reader builds the tokenizer with its class's default special tokens, and
    adds one the file's vocabulary lacks after the last id (GemmaTokenizer's <mask>). No weight
    exists for it: training would index past the embeddings and export refuses it.
    """
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():  # a SentencePiece model read back (convert/gguf_read_back_tokenizer.py)
        return
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    invented = {entry["content"] for entry in data.get("added_tokens", []) if entry["id"] >= n_vocab}
    if not invented:
        return
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < n_vocab]
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key, value in config.items():
        if isinstance(value, str) and value in invented:
            config[key] = None  # e.g. mask_token: the model has none
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
