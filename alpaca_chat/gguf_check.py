"""Validate a GGUF file in Python before llama.cpp ever sees it.

llama.cpp trusts the file it is given: a truncated download, an HTML error
page saved as `.gguf` or a corrupted header can make it dump pages of logs or
abort the process. `check_gguf` reads the header with a small bounded parser
over a memory map (every length and count is checked against the file size
and a sanity cap before it is used; nothing is allocated from an unchecked
count, and big string arrays such as the vocabulary are skipped, not decoded) and raises one of the typed
errors from `errors.py` with a one-line message that names the file.

It checks what llama.cpp's own loader (`gguf.cpp`, `llama-model-loader.cpp`)
would reject: magic bytes, version 2 or 3, value types, tensor names and
dimensions, ggml tensor types, the contiguous aligned layout of the tensor
data, that the data fits in the file, and that `general.architecture` is one
llama.cpp knows. The format constants come from the `gguf` package, which
tracks llama.cpp's.

`check_memory` compares `GGUFInfo.estimated_ram_bytes` with the memory the
machine has available.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import os
import sys
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpaca_chat.errors import InsufficientMemoryError, InvalidModelFileError, ModelNotFoundError

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

KNOWN_ARCHITECTURES: tuple[str, ...] = tuple(gguf.MODEL_ARCH_NAMES.values())
_NOT_LANGUAGE_MODELS = {"clip": "a vision projector (mmproj) file, not a language model"}

# Limits from ggml / llama.cpp's gguf.cpp.
_GGML_MAX_DIMS = 4
_GGML_MAX_NAME = 64  # a tensor name must be shorter than this, in bytes

# Sanity caps: no real model comes near these, a flipped bit easily does.
_ABSURD_COUNT = 1 << 24  # key/value pairs, tensors, or array elements
_ABSURD_STRING = 1 << 24  # bytes in one string (chat templates are a few KiB)
_ABSURD_ELEMENTS = 1 << 40  # elements in one tensor
_SMALL_ARRAY = 512  # numeric arrays up to this length (LLAMA_MAX_LAYERS) are kept in metadata

# RAM estimate: llama.cpp's KV cache is f16 by default; the compute buffers
# hold a micro-batch of activations plus one layer's attention scores.
_KV_BYTES_PER_ELEMENT = 2
_N_UBATCH = 512
_COMPUTE_OVERHEAD_BYTES = 64 * 1024 * 1024

_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, kv count
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VT = gguf.GGUFValueType
_SCALARS: dict[int, struct.Struct] = {
    _VT.UINT8: struct.Struct("<B"),
    _VT.INT8: struct.Struct("<b"),
    _VT.UINT16: struct.Struct("<H"),
    _VT.INT16: struct.Struct("<h"),
    _VT.UINT32: struct.Struct("<I"),
    _VT.INT32: struct.Struct("<i"),
    _VT.FLOAT32: struct.Struct("<f"),
    _VT.BOOL: struct.Struct("<?"),
    _VT.UINT64: struct.Struct("<Q"),
    _VT.INT64: struct.Struct("<q"),
    _VT.FLOAT64: struct.Struct("<d"),
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


@dataclass(frozen=True)
class GGUFInfo:
    """What `check_gguf` learned about a valid GGUF file."""

    path: Path
    version: int
    architecture: str
    name: str | None
    file_size: int
    tensor_count: int
    n_params: int
    tensor_data_bytes: int
    file_type: str | None  # quantization label, e.g. "Q4_1"
    context_length: int | None
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int | None
    # Scalar and string values, plus numeric arrays of up to 256 elements as tuples.
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def arch_value(self, suffix: str) -> Any:
        """The value of `{architecture}.{suffix}` (e.g. "block_count"), or None."""
        return self.metadata.get(f"{self.architecture}.{suffix}")

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """Size of an f16 KV cache for `n_ctx` tokens (0 if the header lacks the shape)."""
        n_layer = _as_int(self.arch_value("block_count"))
        n_embd = _as_int(self.arch_value("embedding_length"))
        n_head = _per_layer(self.arch_value("attention.head_count"), n_layer)
        if not (n_layer and n_embd and n_head and max(n_head) > 0):
            return 0
        n_head_kv = _per_layer(self.arch_value("attention.head_count_kv"), n_layer) or n_head
        k_dim = _as_int(self.arch_value("attention.key_length")) or n_embd // max(n_head)
        v_dim = _as_int(self.arch_value("attention.value_length")) or k_dim
        return n_ctx * sum(n_head_kv) * (k_dim + v_dim) * _KV_BYTES_PER_ELEMENT

    def estimated_ram_bytes(self, n_ctx: int) -> int:
        """Rough RAM needed to chat with `n_ctx` tokens of context.

        Weights (the tensor data, memory-mapped) + f16 KV cache + compute
        buffers (a fixed 64 MiB, one micro-batch of attention scores, and one
        micro-batch of activations: hidden states, feed-forward, logits). Every
        size comes from hyperparameters check_gguf has bounded and matched
        against the tensors.
        """
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        n_head = _per_layer(self.arch_value("attention.head_count"), 1)
        scores = n_ctx * _N_UBATCH * max(n_head or [0]) * 4
        n_embd = _as_int(self.arch_value("embedding_length")) or 0
        n_ff = max(_per_layer(self.arch_value("feed_forward_length"), 1) or [0])
        activations = _N_UBATCH * (4 * n_embd + 2 * n_ff + (self.vocab_size or 0)) * 4
        return (
            self.tensor_data_bytes + self.kv_cache_bytes(n_ctx) + _COMPUTE_OVERHEAD_BYTES + scores + activations
        )


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Validate the GGUF at `path` without loading it; raise a typed error if llama.cpp would fail.

    Raises ModelNotFoundError if the file does not exist, InvalidModelFileError
    for everything else (directory, not GGUF, unsupported version, truncated,
    corrupted header, unsupported architecture).
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
            parsed = _Parser(buf, len(buf), display).parse()
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {display}: {exc.strerror or exc}") from None
    return _build_info(Path(path), display, parsed)


def available_memory_bytes() -> int | None:
    """Memory available to a new process, or None if it cannot be told.

    Linux: MemAvailable from /proc/meminfo, which already counts reclaimable
    page cache (where llama.cpp's memory-mapped weights live). Elsewhere:
    free physical pages from sysconf. Container (cgroup) limits are not read.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(info: GGUFInfo, n_ctx: int, available: int | None = None) -> int:
    """Raise InsufficientMemoryError if the model will not fit; return the estimate in bytes.

    `available` defaults to `available_memory_bytes()`; when that is unknown
    the check is skipped.
    """
    needed = info.estimated_ram_bytes(n_ctx)
    if available is None:
        available = available_memory_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"{info.path} needs about {_gib(needed)} GiB of RAM with a {n_ctx}-token context"
            f" but only {_gib(available)} GiB is available"
        )
    return needed


# --- parsing ------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]
    file_size: int
    types: dict[str, int] = field(default_factory=dict)


class _Parser:
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
        if count > _ABSURD_COUNT:
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
    def parse(self) -> _Parsed:
        version, n_tensors, n_kv = self.parse_header()
        self.section = "metadata"
        metadata, array_lengths = self.parse_metadata(n_kv)
        alignment = self.alignment(metadata)
        self.section = "tensor infos"
        tensors = self.parse_tensor_infos(n_tensors)
        self.section = "tensor data"
        self.check_tensor_data(tensors, _pad(self.pos, alignment), alignment)
        return _Parsed(version, metadata, array_lengths, tensors, self.size, self.types)

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
            label = _short(key)  # file text, made safe for a one-line message
            if key in seen:
                raise self.corrupted(f"duplicate metadata key '{label}'")
            seen.add(key)
            vtype = self.unpack(_U32)
            self.types[key] = vtype
            if vtype == _VT.ARRAY:
                value, length = self.read_array(label)
                array_lengths[key] = length
                if value is not None:
                    metadata[key] = value
            else:
                metadata[key] = self.read_scalar(vtype, label)
        return metadata, array_lengths

    def read_scalar(self, vtype: int, key: str) -> Any:
        if vtype == _VT.STRING:
            return self.string(f"the value of '{key}'")
        s = _SCALARS.get(vtype)
        if s is None:
            raise self.corrupted(f"metadata key '{key}' has unknown value type {vtype}")
        return self.unpack(s)

    def read_array(self, key: str) -> tuple[tuple[Any, ...] | None, int]:
        """Read an array value: small numeric arrays are returned, the rest only skipped."""
        etype = self.unpack(_U32)
        count = self.unpack(_U64)
        if etype == _VT.ARRAY:
            raise self.corrupted(f"metadata key '{key}' is an array of arrays, which llama.cpp cannot read")
        self.check_count(count, f"element count in array '{key}':")
        if etype == _VT.STRING:
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
        if self.types[key] != _VT.UINT32:
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
                raise self.corrupted(f"tensor name '{_short(name)}' is longer than {limit} bytes")
            if name in seen:
                raise self.corrupted(f"duplicate tensor '{_short(name)}'")
            seen.add(name)
            name = _short(name, _GGML_MAX_NAME)
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


# --- hyperparameters -----------------------------------------------------------------------------
#
# llama.cpp reads the hyperparameters into fixed-size arrays and uses them before it checks a single
# tensor shape: a block count of 2**31 allocates per-layer vectors until the OOM killer comes, a NaN
# epsilon trips a GGML_ASSERT (SIGABRT), a head count of 0 divides by zero. So they are checked
# here: types, bounds, finiteness, and consistency with the tensors that are actually in the file.

_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h)
_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_MAX_CONTEXT = 1 << 26  # 64 Mi tokens; the longest published context is 10 Mi
_MAX_WIDTH = 1 << 20  # embedding / feed-forward length
_MAX_HEADS = 1 << 12
_MAX_HEAD_DIM = 1 << 13
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
_INT_TYPES = {_VT.UINT8, _VT.INT8, _VT.UINT16, _VT.INT16, _VT.UINT32, _VT.INT32, _VT.UINT64, _VT.INT64}
_FLOAT_TYPES = {_VT.FLOAT32, _VT.FLOAT64}

# Integer keys (suffix after "{arch}."): (lowest, highest) allowed.
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "block_count": (1, _MAX_LAYERS),
    "context_length": (1, _MAX_CONTEXT),
    "embedding_length": (1, _MAX_WIDTH),
    "embedding_length_out": (0, _MAX_WIDTH),
    "feed_forward_length": (0, _MAX_WIDTH),
    "expert_feed_forward_length": (0, _MAX_WIDTH),
    "expert_shared_feed_forward_length": (0, _MAX_WIDTH),
    "attention.head_count": (0, _MAX_HEADS),
    "attention.head_count_kv": (0, _MAX_HEADS),
    "attention.key_length": (1, _MAX_HEAD_DIM),
    "attention.value_length": (1, _MAX_HEAD_DIM),
    "attention.key_length_swa": (1, _MAX_HEAD_DIM),
    "attention.value_length_swa": (1, _MAX_HEAD_DIM),
    "attention.sliding_window": (0, _MAX_CONTEXT),
    "rope.dimension_count": (0, _MAX_HEAD_DIM),
    "rope.dimension_count_swa": (0, _MAX_HEAD_DIM),
    "rope.scaling.original_context_length": (0, _MAX_CONTEXT),
    "vocab_size": (1, _ABSURD_COUNT),
    "expert_count": (0, _MAX_EXPERTS),
    "expert_used_count": (0, _MAX_EXPERTS),
    "expert_shared_count": (0, _MAX_EXPERTS),
    "expert_group_count": (0, _MAX_EXPERTS),
    "expert_group_used_count": (0, _MAX_EXPERTS),
    "leading_dense_block_count": (0, _MAX_LAYERS),
    "nextn_predict_layers": (0, _MAX_LAYERS),
    "interleave_moe_layer_step": (0, _MAX_LAYERS),
}
# Float keys: (lowest, highest, lowest allowed exclusive?) on top of being finite.
_FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "attention.layer_norm_rms_epsilon": (0.0, 1.0, False),
    "attention.layer_norm_epsilon": (0.0, 1.0, False),
    "attention.group_norm_epsilon": (0.0, 1.0, False),
    "rope.freq_base": (0.0, 1e12, True),
    "rope.freq_base_swa": (0.0, 1e12, True),
    "rope.scaling.factor": (0.0, 1e6, False),
    "rope.scale_linear": (0.0, 1e6, False),
    "rope.scaling.attn_factor": (0.0, 1e6, False),
    "rope.scaling.yarn_log_multiplier": (-1e6, 1e6, False),
    "attention.logit_softcapping": (0.0, 1e6, False),
    "final_logit_softcapping": (0.0, 1e6, False),
    "attention.scale": (0.0, 1e6, False),
    "embedding_scale": (-1e6, 1e6, False),
    "residual_scale": (-1e6, 1e6, False),
    "logit_scale": (-1e6, 1e6, False),
    "expert_weights_scale": (-1e6, 1e6, False),
}
# Per-layer keys: one value, or an array with one value per layer.
_PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")
# Families whose attention/feed-forward tensors have the standard shapes checked below; for others only
# the architecture-independent checks apply (fused or gated projections differ between families).
_STANDARD_SHAPES = frozenset({
    "llama", "mistral3", "qwen2", "qwen3", "qwen3moe", "qwen2moe", "gemma", "gemma2", "gemma3", "phi3",
    "smollm3", "granite", "granitemoe", "olmo", "olmo2", "olmoe", "glm4", "chatglm", "starcoder2",
    "stablelm", "internlm2", "exaone", "cohere2", "command-r", "ernie4_5", "hunyuan-dense",
})


def _check_hyperparameters(
    display: str,
    arch: str,
    md: Mapping[str, Any],
    types: Mapping[str, int],
    array_lengths: Mapping[str, int],
    tensors: list[TensorInfo],
) -> None:
    """Raise InvalidModelFileError (one line naming the key) for a hyperparameter llama.cpp cannot survive."""
    prefix = f"{arch}."

    def fail(key: str, detail: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{display}: {_short(key, 80)} {detail}; the file is corrupt or was converted wrongly")

    # Special token ids: llama.cpp reads them as uint32 and refuses any other type.
    for key, vtype in types.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and vtype != _VT.UINT32:
            raise fail(key, f"has the wrong type ({_type_name(vtype)}, not uint32)")

    # Every float under the architecture, scalar or small array, must be finite.
    for key, value in md.items():
        if not key.startswith(prefix):
            continue
        values = value if isinstance(value, tuple) else (value,)
        if any(type(v) is float and not math.isfinite(v) for v in values):
            raise fail(key, f"is {_fmt(value)}, not a finite number")

    def scalar(suffix: str, *, per_layer: bool = False) -> Any:
        key = prefix + suffix
        if key not in md and key not in array_lengths:
            return None
        vtype = types.get(key)
        if vtype == _VT.ARRAY:
            if not per_layer:
                raise fail(key, "is an array, where llama.cpp reads one value")
            if key not in md:
                raise fail(key, f"has {array_lengths[key]} elements, more than {_MAX_LAYERS} layers")
            return md[key]
        return md[key]

    ints: dict[str, Any] = {}
    for suffix, (low, high) in _INT_BOUNDS.items():
        key = prefix + suffix
        value = scalar(suffix, per_layer=suffix in _PER_LAYER)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and any(type(v) is not int for v in values):
            raise fail(key, "is not an array of integers")
        if not isinstance(value, tuple) and types.get(key) not in _INT_TYPES:
            raise fail(key, f"has the wrong type ({_type_name(types.get(key))}, not an integer)")
        for v in values:
            if not low <= v <= high:
                raise fail(key, f"is {v}, outside {low}..{high}")
        ints[suffix] = value
    for suffix, (low, high, exclusive) in _FLOAT_BOUNDS.items():
        key = prefix + suffix
        value = scalar(suffix)
        if value is None:
            continue
        if types.get(key) not in _FLOAT_TYPES:
            raise fail(key, f"has the wrong type ({_type_name(types.get(key))}, not a float)")
        if value < low or value > high or (exclusive and value == low):
            bound = f"above {low:g}" if exclusive else f"at least {low:g}"
            raise fail(key, f"is {value:g}, not {bound} and at most {high:g}")
    scaling = md.get(prefix + "rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise fail(prefix + "rope.scaling.type", f"is '{_short(str(scaling))}', not one of {', '.join(_ROPE_SCALING_TYPES)}")

    by_name = {t.name: t for t in tensors}
    n_layer = ints.get("block_count")
    _check_layers(fail, prefix, n_layer, by_name, ints, array_lengths)
    if n_layer is None:
        return
    _check_experts(fail, prefix, ints, n_layer, by_name)
    _check_widths(fail, prefix, arch, md, ints, n_layer, by_name, array_lengths)


def _check_layers(fail, prefix, n_layer, by_name, ints, array_lengths) -> None:
    layers = set()
    for name in by_name:
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            if index.isdigit():
                layers.add(int(index))
    key = prefix + "block_count"
    if n_layer is None:
        if layers:
            raise fail(key, f"is missing, but the file has {max(layers) + 1} blocks of tensors")
        return
    if layers and max(layers) + 1 != n_layer:
        raise fail(key, f"is {n_layer}, but the file has tensors for {max(layers) + 1} blocks")
    for suffix in _PER_LAYER:
        value = ints.get(suffix)
        if isinstance(value, tuple) and len(value) != n_layer:
            raise fail(prefix + suffix, f"has {len(value)} per-layer values for {n_layer} blocks")
    nextn = ints.get("nextn_predict_layers", 0)
    if nextn > n_layer:
        raise fail(prefix + "nextn_predict_layers", f"is {nextn}, more than the {n_layer} blocks")
    dense = ints.get("leading_dense_block_count", 0)
    if dense > n_layer:
        raise fail(prefix + "leading_dense_block_count", f"is {dense}, more than the {n_layer} blocks")


def _check_experts(fail, prefix, ints, n_layer, by_name) -> None:
    """The asserts of llama_model_base::load_hparams about experts, as one-line errors."""
    n_expert = ints.get("expert_count", 0)
    used = _layer_values(ints.get("expert_used_count", 0), n_layer)
    groups = ints.get("expert_group_count", 0)
    used_key = prefix + "expert_used_count"
    if max(used) > n_expert:
        raise fail(used_key, f"is {max(used)}, more than expert_count {n_expert}")
    if n_expert > 0:
        if max(used) == 0:
            raise fail(used_key, f"is 0 but {prefix}expert_count is {n_expert}")
        if groups >= n_expert:
            raise fail(prefix + "expert_group_count", f"is {groups}, not below expert_count {n_expert}")
        if groups > 1:
            group_used = ints.get("expert_group_used_count", 0)
            if n_expert % groups:
                raise fail(prefix + "expert_group_count", f"{groups} does not divide expert_count {n_expert}")
            if not 0 < group_used < groups:
                raise fail(prefix + "expert_group_used_count", f"is {group_used}, not in 1..{groups - 1}")
    elif groups:
        raise fail(prefix + "expert_group_count", f"is {groups} in a model without experts")
    for i in range(n_layer):
        for part in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            t = by_name.get(f"blk.{i}.{part}.weight")
            if t is not None and (len(t.shape) < 3 or t.shape[2] != n_expert):
                got = t.shape[2] if len(t.shape) >= 3 else 1
                raise fail(prefix + "expert_count", f"is {n_expert}, but tensor '{t.name}' holds {got} experts")


def _check_widths(fail, prefix, arch, md, ints, n_layer, by_name, array_lengths) -> None:
    """Embedding, head and feed-forward sizes: divisible as llama.cpp assumes, and matching the tensors."""
    n_embd = ints.get("embedding_length")
    embd_key = prefix + "embedding_length"
    n_tokens = array_lengths.get(gguf.Keys.Tokenizer.LIST)
    for name in ("token_embd.weight", "output.weight"):
        t = by_name.get(name)
        if t is None or len(t.shape) != 2:
            continue
        if n_embd is not None and t.shape[0] != n_embd and arch in _STANDARD_SHAPES:
            raise fail(embd_key, f"is {n_embd}, but tensor '{name}' has rows of {t.shape[0]}")
        if n_tokens is not None and t.shape[1] != n_tokens:
            raise fail(gguf.Keys.Tokenizer.LIST, f"has {n_tokens} tokens, but tensor '{name}' has {t.shape[1]} rows")
    vocab = ints.get("vocab_size")
    if vocab is not None and n_tokens is not None and vocab != n_tokens:
        raise fail(prefix + "vocab_size", f"is {vocab}, but {gguf.Keys.Tokenizer.LIST} has {n_tokens} tokens")
    heads = _layer_values(ints.get("attention.head_count", 0), n_layer)
    heads_kv = _layer_values(ints.get("attention.head_count_kv", ints.get("attention.head_count", 0)), n_layer)
    kv_key = prefix + "attention.head_count_kv"
    for i, (h, kv) in enumerate(zip(heads, heads_kv)):
        if kv > h or (kv and h % kv):
            raise fail(kv_key, f"is {kv} in block {i}, which does not divide head_count {h}")
    if n_embd is None or not heads[0]:
        return
    head_k = ints.get("attention.key_length")
    head_v = ints.get("attention.value_length")
    if head_k is None or head_v is None:
        if n_embd % heads[0]:
            raise fail(prefix + "attention.head_count", f"is {heads[0]}, which does not divide embedding_length {n_embd}")
        head_k = head_k or n_embd // heads[0]
        head_v = head_v or n_embd // heads[0]
    n_rot = ints.get("rope.dimension_count")
    if n_rot is not None and (n_rot > head_k or n_rot % 2):
        raise fail(prefix + "rope.dimension_count", f"is {n_rot}, not an even number up to the head size {head_k}")
    if arch not in _STANDARD_SHAPES:
        return
    n_ff = _layer_values(ints.get("feed_forward_length", 0), n_layer)
    n_ff_exp = ints.get("expert_feed_forward_length")
    for i in range(n_layer):
        h, kv = heads[i], heads_kv[i]
        expected = {
            "attn_q": (h * head_k, "attention.head_count"),
            "attn_k": (kv * head_k, "attention.head_count_kv"),
            "attn_v": (kv * head_v, "attention.head_count_kv"),
            "attn_qkv": (h * head_k + kv * (head_k + head_v), "attention.head_count_kv"),
        }
        for part, (width, suffix) in expected.items():
            t = by_name.get(f"blk.{i}.{part}.weight")
            if t is not None and len(t.shape) == 2 and t.shape[1] != width:
                raise fail(prefix + suffix, f"does not match tensor '{t.name}' of shape {list(t.shape)}")
        t = by_name.get(f"blk.{i}.ffn_down.weight")
        if t is not None and len(t.shape) == 2 and t.shape[0] != n_ff[i]:
            raise fail(prefix + "feed_forward_length", f"is {n_ff[i]}, but tensor '{t.name}' has rows of {t.shape[0]}")
        t = by_name.get(f"blk.{i}.ffn_down_exps.weight")
        if t is not None and n_ff_exp is not None and t.shape[0] != n_ff_exp:
            raise fail(prefix + "expert_feed_forward_length", f"is {n_ff_exp}, but tensor '{t.name}' has rows of {t.shape[0]}")


def _layer_values(value: Any, n_layer: int) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value] * n_layer


def _type_name(vtype: int | None) -> str:
    try:
        return _VT(vtype).name.lower()
    except ValueError:
        return str(vtype)


def _fmt(value: Any) -> str:
    return str(value) if not isinstance(value, tuple) else f"an array containing {next(v for v in value if type(v) is float and not math.isfinite(v))}"


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


def _build_info(path: Path, display: str, parsed: _Parsed) -> GGUFInfo:
    md = parsed.metadata
    arch = md.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise InvalidModelFileError(f"{display} has no general.architecture key, so llama.cpp cannot load it")
    if not isinstance(arch, str):
        raise InvalidModelFileError(f"{display} has a corrupted header: general.architecture is not a string")
    if arch in _NOT_LANGUAGE_MODELS:
        raise InvalidModelFileError(f"{display} is {_NOT_LANGUAGE_MODELS[arch]} (architecture '{arch}')")
    if arch not in KNOWN_ARCHITECTURES:
        known = [a for a in KNOWN_ARCHITECTURES if a not in _NOT_LANGUAGE_MODELS]
        raise InvalidModelFileError(
            f"{display}: architecture '{_short(arch)}' is not supported by llama.cpp"
            f" (known: {', '.join(known[:8])} and {len(known) - 8} more)"
        )
    tokens = parsed.array_lengths.get(gguf.Keys.Tokenizer.LIST)
    _check_hyperparameters(display, arch, md, parsed.types, parsed.array_lengths, parsed.tensors)
    return GGUFInfo(
        path=path,
        version=parsed.version,
        architecture=arch,
        name=_str_or_none(md.get(gguf.Keys.General.NAME)),
        file_size=parsed.file_size,
        tensor_count=len(parsed.tensors),
        n_params=sum(t.n_elements for t in parsed.tensors),
        tensor_data_bytes=sum(t.n_bytes for t in parsed.tensors),
        file_type=_file_type_label(md.get(gguf.Keys.General.FILE_TYPE), parsed.tensors),
        context_length=_as_int(md.get(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch))),
        chat_template=_str_or_none(md.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)),
        bos_token_id=_as_int(md.get(gguf.Keys.Tokenizer.BOS_ID)),
        eos_token_id=_as_int(md.get(gguf.Keys.Tokenizer.EOS_ID)),
        vocab_size=tokens or _as_int(md.get(gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch))),
        metadata=md,
    )


def _file_type_label(value: Any, tensors: list[TensorInfo]) -> str | None:
    """general.file_type as a label like "Q4_1"; without it, the type holding the most bytes."""
    if _as_int(value) is not None:
        try:
            name = gguf.LlamaFileType(value).name
        except ValueError:
            return None
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    by_type: dict[int, int] = {}
    for t in tensors:
        by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
    if not by_type:
        return None
    return gguf.GGMLQuantizationType(max(by_type, key=by_type.__getitem__)).name


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _as_int(value: Any) -> int | None:
    return value if type(value) is int else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _per_layer(value: Any, n_layer: int | None) -> list[int] | None:
    """A per-layer hyperparameter, given either as one int or as an array with one per layer."""
    if type(value) is int:
        return [value] * (n_layer or 1)
    if isinstance(value, tuple) and value and all(type(v) is int for v in value):
        return list(value)
    return None


_CONTROL_CHARS = {c: "?" for c in [*range(32), 127, 0x85, 0x2028, 0x2029]}


def _short(text: str, limit: int = 40) -> str:
    """Text read from the file, fit for a one-line message: no control characters, bounded length."""
    text = text[: limit + 1].translate(_CONTROL_CHARS)
    return text if len(text) <= limit else text[:limit] + "..."


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f}"
