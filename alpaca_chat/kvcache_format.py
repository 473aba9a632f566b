"""A saved KV state file's bytes and what a state is valid for (`StateKey`): kvcache.py's format.

A state file is never trusted: `decode` checks the magic and version, every size against the file's
real size, the token count and a SHA-256 of the tokens and a CRC-32 of the payload; `check_key` that
it was made for this model, context size, KV cache type, template and LoRA adapter set.

Layout (little-endian):

    b"ALPACAKV" | u32 version | u32 header length | header (JSON, UTF-8)
    | tokens (i32 each) | payload (llama_state_seq_get_data of sequence 0)
"""

import hashlib
import json
import os
import struct
import sys
import zlib
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca_chat.errors import AlpacaChatError

MAGIC = b"ALPACAKV"
VERSION = 1
_PREAMBLE = struct.Struct("<8sII")
MAX_HEADER_BYTES = 64 * 1024
MAX_TOKENS = 1 << 24
MIB = 1024 * 1024
# The model's identity: its size and a SHA-256 of its first 8 MiB (the GGUF header:
# metadata, vocabulary, tensor table, or most of it for a huge vocabulary) and of its
# last MiB (weights: two fine-tunes of one base differ there, not in the header).
MODEL_HASH_HEAD = 8 * MIB
MODEL_HASH_TAIL = 1 * MIB


class StateRejected(AlpacaChatError):
    """A saved state that must not be used; str() says why in one line."""


@dataclass(frozen=True)
class StateKey:
    """What a state is only valid for."""

    model_size: int
    model_sha256: str
    n_ctx: int
    kv_type: str
    template_sha256: str
    # The LoRA adapters the state was computed under (Engine.adapter_key: their content hashes and
    # scales, "" for none): keys and values of one set are wrong under another.
    adapters: str = ""


_model_hashes: dict[tuple, str] = {}


def state_key(model_path: str | os.PathLike, n_ctx: int, kv_type: str, template_text: str,
              adapters: str = "") -> StateKey:
    """The key for an engine's states (the model hash is computed once per file version)."""
    path = Path(model_path)
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key not in _model_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(MODEL_HASH_HEAD))
            f.seek(max(0, st.st_size - MODEL_HASH_TAIL))
            digest.update(f.read(MODEL_HASH_TAIL))
        _model_hashes[cache_key] = digest.hexdigest()
    template = hashlib.sha256(template_text.encode("utf-8")).hexdigest()
    return StateKey(st.st_size, _model_hashes[cache_key], n_ctx, kv_type, template, adapters)


def tokens_sha256(tokens: list[int]) -> str:
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()


# -- the format --------------------------------------------------------------------


@dataclass
class _Decoded:
    conversation_id: int
    header: dict
    tokens: list[int]
    payload: bytearray


def encode(conversation_id: int, key: StateKey, tokens: list[int], payload) -> bytes:
    """A whole state file's bytes (what `save` writes as the header, then the payload)."""
    return encode_header(conversation_id, key, tokens, payload) + bytes(payload)


def encode_header(conversation_id: int, key: StateKey, tokens: list[int], payload) -> bytes:
    """Everything of a state file before its payload: preamble, JSON header (with the payload's
    size and CRC-32, computed on `payload` where it lies) and the tokens."""
    token_bytes = _token_bytes(tokens)
    payload = memoryview(payload).cast("B")
    header = {
        "conversation_id": int(conversation_id),
        **asdict(key),
        "n_tokens": len(tokens),
        "tokens_sha256": hashlib.sha256(token_bytes).hexdigest(),
        "payload_size": len(payload),
        "payload_crc32": zlib.crc32(payload),
    }
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    return _PREAMBLE.pack(MAGIC, VERSION, len(head)) + head + token_bytes


def decode(f, file_size: int, name: str = "state") -> _Decoded:
    """Read and check a state file's structure and checksums (not its key)."""
    header, tokens = _decode_tokens(f, file_size, name)
    payload = bytearray(header["payload_size"])  # the file's size was checked: no allocation a header alone asked for
    if _read_checksummed(f, payload, name) != header["payload_crc32"]:
        raise StateRejected(f"{name}: payload checksum mismatch")
    return _Decoded(header["conversation_id"], header, tokens, payload)


def _decode_tokens(f, file_size: int, name: str) -> tuple[dict, list[int]]:
    """A state file's checked header and tokens (the file then stands at its payload)."""
    preamble = f.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise StateRejected(f"{name}: truncated ({file_size} bytes)")
    magic, version, head_len = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise StateRejected(f"{name}: not an alpaca-chat KV state")
    if version != VERSION:
        raise StateRejected(f"{name}: format version {version}, this alpaca-chat reads {VERSION}")
    if head_len > MAX_HEADER_BYTES or _PREAMBLE.size + head_len > file_size:
        raise StateRejected(f"{name}: header of {head_len} bytes does not fit the file")
    header = _parse_header(f.read(head_len), name)
    n_tokens, payload_size = header["n_tokens"], header["payload_size"]
    expected = _PREAMBLE.size + head_len + 4 * n_tokens + payload_size
    if expected != file_size:
        raise StateRejected(f"{name}: header promises {expected} bytes, the file has {file_size}")
    token_bytes = f.read(4 * n_tokens)
    if len(token_bytes) != 4 * n_tokens:
        raise StateRejected(f"{name}: truncated while reading")
    if hashlib.sha256(token_bytes).hexdigest() != header["tokens_sha256"]:
        raise StateRejected(f"{name}: token checksum mismatch")
    tokens = array("i", token_bytes)
    if sys.byteorder != "little":
        tokens.byteswap()
    return header, tokens.tolist()


# The payload is read and checksummed a piece at a time, each piece while it is still in the CPU's
# cache: 20-25 % faster than reading it all, then checksumming it all (58 MB: 50 ms against 64).
_READ_CHUNK = 256 * 1024


def _read_checksummed(f, payload: bytearray, name: str = "state") -> int:
    """Fill `payload` from `f`; return its CRC-32. StateRejected if the file ends first."""
    view, crc = memoryview(payload), 0
    for offset in range(0, len(payload), _READ_CHUNK):
        piece = view[offset : offset + _READ_CHUNK]
        if f.readinto(piece) != len(piece):
            raise StateRejected(f"{name}: truncated while reading")
        crc = zlib.crc32(piece, crc)
    return crc


_HEADER_TYPES = {
    "conversation_id": int,
    "model_size": int,
    "model_sha256": str,
    "n_ctx": int,
    "kv_type": str,
    "template_sha256": str,
    "adapters": str,
    "n_tokens": int,
    "tokens_sha256": str,
    "payload_size": int,
    "payload_crc32": int,
}


def _parse_header(raw: bytes, name: str) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateRejected(f"{name}: unreadable header") from exc
    if not isinstance(header, dict):
        raise StateRejected(f"{name}: unreadable header")
    # Files written before LoRA adapters existed were computed without any.
    header.setdefault("adapters", "")
    for field_name, kind in _HEADER_TYPES.items():
        value = header.get(field_name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise StateRejected(f"{name}: header field {field_name} missing or invalid")
    if not (0 < header["n_tokens"] <= MAX_TOKENS) or header["payload_size"] <= 0:
        raise StateRejected(f"{name}: implausible sizes in the header")
    return header


def check_key(header: dict, key: StateKey, name: str = "state") -> None:
    reasons = {
        "model_size": "another model",
        "model_sha256": "another model",
        "n_ctx": "another context size",
        "kv_type": "another KV cache type",
        "template_sha256": "another chat template",
        "adapters": "another set of LoRA adapters",
    }
    for field_name, reason in reasons.items():
        if header[field_name] != getattr(key, field_name):
            raise StateRejected(
                f"{name}: made for {reason} ({field_name} {header[field_name]!r}, now {getattr(key, field_name)!r})"
            )


def _peek_tokens(path: Path) -> int:
    """The token count a file's header claims (0 when unreadable): for listings only."""
    with open(path, "rb") as f:
        return _read_token_count(f)


def _read_token_count(f) -> int:
    preamble = f.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        return 0
    magic, _version, head_len = _PREAMBLE.unpack(preamble)
    if magic != MAGIC or head_len > MAX_HEADER_BYTES:
        return 0
    try:
        value = json.loads(f.read(head_len).decode("utf-8")).get("n_tokens", 0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _token_bytes(tokens: list[int]) -> bytes:
    packed = array("i", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


