"""The bounded binary parser of a GGUF header (what `gguf_check` validates).

`parse_file` reads the header over a memory map: every length and count is
checked against the file size and a sanity cap before it is used, nothing is
allocated from an unchecked count, and big string arrays such as the
vocabulary are skipped, not decoded. It rejects what llama.cpp's own loader
(`gguf.cpp`) would: magic bytes, version 2 or 3, value types, tensor names and
dimensions, ggml tensor types, the contiguous aligned layout of the tensor
data, and data that does not fit in the file. Errors are the typed ones of
`errors.py`, one line naming the file. The format constants come from the
`gguf` package, which tracks llama.cpp's.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from alpaca_chat.errors import InvalidModelFileError, ModelNotFoundError

SUPPORTED_VERSIONS = (2, 3)


def _gguf_constants():
    """The `gguf` package's constants module, without the rest of the package.

    `import gguf` also loads its reader, writer and numpy: ~150 ms that every
    `alpaca-chat --prompt` would pay. constants.py needs only the stdlib.
    """
    name = "gguf.constants"
    if name not in sys.modules:
        package_dir = importlib.util.find_spec("gguf").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(package_dir, "constants.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


gguf = _gguf_constants()

# Limits from ggml / llama.cpp's gguf.cpp.
_GGML_MAX_DIMS = 4
_GGML_MAX_NAME = 64  # a tensor name must be shorter than this, in bytes

# Sanity caps: no real model comes near these, a flipped bit easily does.
ABSURD_COUNT = 1 << 24  # key/value pairs, tensors, or array elements
_ABSURD_STRING = 1 << 24  # bytes in one string (chat templates are a few KiB)
_ABSURD_ELEMENTS = 1 << 40  # elements in one tensor
_SMALL_ARRAY = 512  # numeric arrays up to this length (LLAMA_MAX_LAYERS) are kept in metadata

_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, kv count
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
VT = gguf.GGUFValueType
_SCALARS: dict[int, struct.Struct] = {
    VT.UINT8: struct.Struct("<B"),
    VT.INT8: struct.Struct("<b"),
    VT.UINT16: struct.Struct("<H"),
    VT.INT16: struct.Struct("<h"),
    VT.UINT32: struct.Struct("<I"),
    VT.INT32: struct.Struct("<i"),
    VT.FLOAT32: struct.Struct("<f"),
    VT.BOOL: struct.Struct("<?"),
    VT.UINT64: struct.Struct("<Q"),
    VT.INT64: struct.Struct("<q"),
    VT.FLOAT64: struct.Struct("<d"),
}
_MAGIC = _U32.pack(gguf.GGUF_MAGIC)  # b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header; `offset` is relative to the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int
    n_bytes: int


def parse_file(path: str | os.PathLike[str]) -> Parsed:
    """Parse the header of the GGUF at `path`; raise a typed one-line error if llama.cpp would fail.

    ModelNotFoundError if the file does not exist, InvalidModelFileError for
    everything else (directory, not GGUF, unsupported version, truncated,
    corrupted header).
    """
    display = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file not found: {display}") from None
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {display}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidModelFileError(f"{display} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelFileError(f"{display} is not a regular file")
    if st.st_size == 0:
        raise InvalidModelFileError(f"{display} is empty (0 bytes), not a GGUF file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return Parser(buf, len(buf), display).parse()
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {display}: {exc.strerror or exc}") from None


@dataclass
class Parsed:
    """What the header holds: scalar and string values plus numeric arrays of up to 512 elements in
    `metadata`, every array's length in `array_lengths`, every key's GGUF value type in `types`."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]
    file_size: int
    types: dict[str, int] = field(default_factory=dict)


class Parser:
    """Walks the header of a memory-mapped GGUF, checking every read against the file size."""

    def __init__(self, buf: mmap.mmap, size: int, display: str) -> None:
        self.buf = buf
        self.size = size
        self.display = display
        self.pos = 0
        self.section = "header"
        self.types: dict[str, int] = {}  # metadata key -> GGUF value type

    # errors
    def truncated(self, expected: int) -> InvalidModelFileError:
        return InvalidModelFileError(
            f"{self.display} is truncated: expected at least {expected} bytes, file has {self.size}"
            f" (cut off in the {self.section}; re-download it)"
        )

    def corrupted(self, detail: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.display} has a corrupted header: {detail}")

    def check_string_length(self, n: int, what: str) -> None:
        """A string longer than the file is corrupt, unless the file could merely be cut short."""
        if n > self.size and n > _ABSURD_STRING:
            raise self.corrupted(f"{what} has length {n}, larger than the whole file")

    def check_count(self, count: int, what: str) -> None:
        if count > ABSURD_COUNT:
            raise self.corrupted(f"absurd {what} {count}")

    # primitive reads
    def need(self, n: int) -> None:
        if self.pos + n > self.size:
            raise self.truncated(self.pos + n)

    def unpack(self, s: struct.Struct) -> Any:
        self.need(s.size)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def string(self, what: str) -> str:
        n = self.unpack(_U64)
        self.check_string_length(n, what)
        self.need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        # llama.cpp reads keys, names and values as C strings: what follows a NUL does not exist for it.
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def skip_strings(self, count: int, key: str) -> None:
        buf, size, pos = self.buf, self.size, self.pos
        unpack_from = _U64.unpack_from
        # llama.cpp aborts (GGML_ASSERT in llama_vocab::load) on two equal tokens: the vocabulary
        # is not decoded, but its raw strings (up to a NUL, as llama.cpp reads them) are compared.
        seen: set[bytes] | None = set() if key == gguf.Keys.Tokenizer.LIST else None
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.truncated(pos + 8)
            (n,) = unpack_from(buf, pos)
            start = pos + 8
            pos = start + n
            if pos > size:
                self.pos = start - 8
                self.check_string_length(n, f"a string in array '{key}'")
                raise self.truncated(pos)
            if seen is not None:
                token = buf[start:pos].split(b"\0", 1)[0]  # llama.cpp reads them as C strings
                if token in seen:
                    raise self.corrupted(f"{key} has a duplicate token at index {index}")
                seen.add(token)
        self.pos = pos

    # sections
    def parse(self) -> Parsed:
        version, n_tensors, n_kv = self.parse_header()
        self.section = "metadata"
        metadata, array_lengths = self.parse_metadata(n_kv)
        alignment = self.alignment(metadata)
        self.section = "tensor infos"
        tensors = self.parse_tensor_infos(n_tensors)
        self.section = "tensor data"
        self.check_tensor_data(tensors, _pad(self.pos, alignment), alignment)
        return Parsed(version, metadata, array_lengths, tensors, self.size, self.types)

    def parse_header(self) -> tuple[int, int, int]:
        head = self.buf[:16]
        if head[:4] != _MAGIC:
            if _MAGIC.startswith(head[:4]):
                raise self.truncated(_HEADER.size)
            raise InvalidModelFileError(_bad_magic_message(self.display, self.buf[:64]))
        if len(head) >= 8:
            (version,) = _U32.unpack_from(head, 4)
            _check_version(self.display, version)
        self.need(_HEADER.size)
        _, version, n_tensors, n_kv = _HEADER.unpack_from(self.buf, 0)
        self.pos = _HEADER.size
        self.check_count(n_tensors, "tensor count")
        self.check_count(n_kv, "metadata key/value count")
        return version, n_tensors, n_kv

    def parse_metadata(self, n_kv: int) -> tuple[dict[str, Any], dict[str, int]]:
        metadata: dict[str, Any] = {}
        array_lengths: dict[str, int] = {}
        seen: set[str] = set()
        for _ in range(n_kv):
            key = self.string("a metadata key")
            label = printable(key)  # file text, made safe for a one-line message
            if key in seen:
                raise self.corrupted(f"duplicate metadata key '{label}'")
            seen.add(key)
            vtype = self.unpack(_U32)
            self.types[key] = vtype
            if vtype == VT.ARRAY:
                value, length = self.read_array(label)
                array_lengths[key] = length
                if value is not None:
                    metadata[key] = value
            else:
                metadata[key] = self.read_scalar(vtype, label)
        return metadata, array_lengths

    def read_scalar(self, vtype: int, key: str) -> Any:
        if vtype == VT.STRING:
            return self.string(f"the value of '{key}'")
        s = _SCALARS.get(vtype)
        if s is None:
            raise self.corrupted(f"metadata key '{key}' has unknown value type {vtype}")
        return self.unpack(s)

    def read_array(self, key: str) -> tuple[tuple[Any, ...] | None, int]:
        """Read an array value: small numeric arrays are returned, the rest only skipped."""
        etype = self.unpack(_U32)
        count = self.unpack(_U64)
        if etype == VT.ARRAY:
            raise self.corrupted(f"metadata key '{key}' is an array of arrays, which llama.cpp cannot read")
        self.check_count(count, f"element count in array '{key}':")
        if etype == VT.STRING:
            self.skip_strings(count, key)
            return None, count
        s = _SCALARS.get(etype)
        if s is None:
            raise self.corrupted(f"array '{key}' has unknown element type {etype}")
        n_bytes = count * s.size
        self.need(n_bytes)
        value = None
        if count <= _SMALL_ARRAY:
            value = struct.unpack_from(f"<{count}{s.format[1:]}", self.buf, self.pos)
        self.pos += n_bytes
        return value, count

    def alignment(self, metadata: Mapping[str, Any]) -> int:
        key = gguf.Keys.General.ALIGNMENT
        if key not in metadata:
            return gguf.GGUF_DEFAULT_ALIGNMENT
        value = metadata[key]
        # llama.cpp aborts (not just fails) if this key is not a uint32: check the type too.
        if self.types[key] != VT.UINT32:
            raise self.corrupted(f"{key} has value type {self.types[key]}, not uint32")
        if value == 0 or value & (value - 1):
            raise self.corrupted(f"{key} is {value}, not a power of two")
        return value

    def parse_tensor_infos(self, n_tensors: int) -> list[TensorInfo]:
        tensors: list[TensorInfo] = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            start = self.pos
            name = self.string("a tensor name")
            if self.pos - start - 8 >= _GGML_MAX_NAME:
                limit = _GGML_MAX_NAME - 1
                raise self.corrupted(f"tensor name '{printable(name)}' is longer than {limit} bytes")
            if name in seen:
                raise self.corrupted(f"duplicate tensor '{printable(name)}'")
            seen.add(name)
            name = printable(name, _GGML_MAX_NAME)
            n_dims = self.unpack(_U32)
            if n_dims > _GGML_MAX_DIMS:
                raise self.corrupted(f"tensor '{name}' has {n_dims} dimensions (at most {_GGML_MAX_DIMS})")
            shape = tuple(self.unpack(_U64) for _ in range(n_dims))
            ggml_type = self.unpack(_U32)
            offset = self.unpack(_U64)
            tensors.append(self.tensor_info(name, shape, ggml_type, offset))
        return tensors

    def tensor_info(self, name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> TensorInfo:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.corrupted(f"tensor '{name}' has unknown ggml type {ggml_type}") from None
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if n_elements > _ABSURD_ELEMENTS:
            raise self.corrupted(f"tensor '{name}' has absurd dimensions {list(shape)}")
        if shape and shape[0] % block_size:
            raise self.corrupted(
                f"tensor '{name}' row size {shape[0]} is not a multiple"
                f" of the {qtype.name} block size {block_size}"
            )
        n_bytes = n_elements // block_size * type_size
        return TensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes)

    def check_tensor_data(self, tensors: list[TensorInfo], data_start: int, alignment: int) -> None:
        """llama.cpp wants the tensors in order, each padded to the alignment, all within the file."""
        expected = 0
        end = data_start
        for t in tensors:
            if t.offset != expected:
                raise self.corrupted(f"tensor '{t.name}' has data offset {t.offset}, expected {expected}")
            expected += _pad(t.n_bytes, alignment)
            end = data_start + t.offset + t.n_bytes
        if end > self.size:
            raise self.truncated(end)

# --- helpers --------------------------------------------------------------------------------------


def _check_version(display: str, version: int) -> None:
    if version in SUPPORTED_VERSIONS:
        return
    if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
        raise InvalidModelFileError(
            f"{display} is a big-endian GGUF (version bytes {version:#010x});"
            " llama.cpp here reads little-endian files"
        )
    if version == 1:
        raise InvalidModelFileError(
            f"{display} uses GGUF version 1, which llama.cpp no longer reads"
            " (versions 2 and 3); re-convert it"
        )
    raise InvalidModelFileError(
        f"{display} uses unsupported GGUF version {version}; llama.cpp reads versions 2 and 3"
    )


def _bad_magic_message(display: str, head: bytes) -> str:
    message = f"{display} is not a GGUF file (bad magic bytes {bytes(head[:4])!r})"
    guess = _guess_format(bytes(head))
    return f"{message}; it looks like {guess}" if guess else message


def _guess_format(head: bytes) -> str | None:
    """Name common wrong files cheaply from their first bytes."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")):
        return "an HTML page, probably a failed download"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself"
    if head[8:10] == b'{"':
        return "a safetensors file; convert it to GGUF first"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a PyTorch checkpoint?); convert it to GGUF first"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch checkpoint?); convert it to GGUF first"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg"):
        return "an old GGML/GGJT model, which llama.cpp no longer reads; convert it to GGUF"
    if text.startswith((b"{", b"[")):
        return "JSON, probably an error response from a failed download"
    return None

def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def as_int(value: Any) -> int | None:
    return value if type(value) is int else None


_CONTROL_CHARS = {c: "?" for c in [*range(32), 127, 0x85, 0x2028, 0x2029]}


def printable(text: str, limit: int = 40) -> str:
    """Text read from the file, fit for a one-line message: no control characters, bounded length."""
    text = text[: limit + 1].translate(_CONTROL_CHARS)
    return text if len(text) <= limit else text[:limit] + "..."
