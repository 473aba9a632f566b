"""A Hugging Face checkpoint on disk: config.json, the weight files, one tensor at a time.

Safetensors is read without torch. `safetensors.safe_open` validates each file
(header, offsets, that the data covers the file: a truncated download fails
here, before any output exists) and lists its tensors. The data of one tensor
is then read from its byte range in the file, into memory it alone owns, and
freed once written: peak memory follows the largest tensor, not the model.
bfloat16, which numpy lacks, is widened to float32 exactly with bit shifts,
a few MB at a time as it is read (no second full-size copy). A tensor bound
for an F16 GGUF can be narrowed as it is read too: then no float32 copy of it
exists at all, and the peak is about its F16 size.

A sharded checkpoint (`model.safetensors.index.json`) is checked against its
index before anything is written: every shard the index names must exist,
and every tensor must be in the shard the index names (a stale or hand-edited
index fails naming the tensor and both shards). A tensor that a shard holds
but the index does not list is accepted and read from that shard, as
transformers does (it loads every tensor of every shard the index names);
llama.cpp's converter refuses it. Files the index does not name are ignored,
as both do.

Pickled `.bin` checkpoints can run code when loaded; they are refused unless
the caller allows them, and then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_chat.errors import ConversionError


class CheckpointError(ConversionError):
    """The checkpoint is missing, incomplete or unreadable."""


# safetensors dtype -> numpy dtype of the stored bytes (BF16 is read as raw uint16).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.md"]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its dtype and shape as stored, and its bytes in a file."""

    name: str
    dtype: str  # safetensors dtype name: BF16, F16, F32...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute offset of the data in `file` (safetensors only)
    nbytes: int = 0

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """A checkpoint directory, indexed but not loaded."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    source: str  # what the user named: a directory, or a hub id
    pickled: bool = False
    _pickle_cache: dict[Path, dict] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    def read(self, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """One tensor in its stored shape: as float32 (bf16 widened), float16 or float64.

        With `dtype` (e.g. float16), converted to it as it is read, a few MB at a time: the
        values are those of a float32 read then cast (bf16 and float64 go through float32),
        but no full-size float32 copy ever exists.
        """
        entry = self.tensors[name]
        if self.pickled:
            data = self._read_pickled(entry)
            return data if dtype is None else _as_working_float(data).astype(dtype)
        try:
            with open(entry.file, "rb", buffering=0) as f:
                f.seek(entry.offset)
                data = _read_converted(f, entry, dtype)
        except OSError as exc:
            raise CheckpointError(f"cannot read {entry.file}: {exc.strerror or exc}") from exc
        return data.reshape(entry.shape)

    def _read_pickled(self, entry: TensorEntry) -> np.ndarray:
        import torch  # only on the --allow-pickle path

        state = self._pickle_cache.get(entry.file)
        if state is None:
            self._pickle_cache.clear()  # one shard in memory at a time
            state = self._pickle_cache[entry.file] = _torch_load(entry.file)
        tensor = state[entry.name]
        if tensor.dtype == torch.bfloat16:
            return bf16_to_f32(tensor.view(torch.int16).numpy().view(np.uint16))
        return tensor.numpy()


def bf16_to_f32(data: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: the same bits in the high half, exactly."""
    wide = data.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized buffer, not two
    return wide.view(np.float32)


_CHUNK_ELEMENTS = 1 << 22  # values converted per read: 4M (8 MB of bf16, 16 MB as float32)


def _read_into(f, out: np.ndarray, entry: TensorEntry) -> None:
    """Fill `out` (flat) from `f`: one read may return less than asked (on Linux, at most ~2 GB)."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{entry.file.name} is truncated: tensor {entry.name} is incomplete")
        done += n


def _read_converted(f, entry: TensorEntry, dtype: np.dtype | type | None) -> np.ndarray:
    """A tensor's data (flat) from `f`, as `dtype` (default: float32 for bf16, else as stored).

    Read straight into the result when no conversion is needed; otherwise chunk by chunk
    through one small buffer, bf16 widened exactly by a bit shift.
    """
    stored = _ST_DTYPES[entry.dtype]
    n = entry.n_elements
    target = np.dtype(dtype) if dtype is not None else np.dtype(np.float32) if entry.dtype == "BF16" else stored
    out = np.empty(n, dtype=target)
    if target == stored and entry.dtype != "BF16":
        _read_into(f, out, entry)
        return out
    chunk = np.empty(max(1, min(n, _CHUNK_ELEMENTS)), dtype=stored)
    wide = np.empty(len(chunk), dtype=np.uint32) if entry.dtype == "BF16" and target != np.float32 else None
    for start in range(0, n, len(chunk)):
        part = chunk[: min(len(chunk), n - start)]
        _read_into(f, part, entry)
        dest = out[start : start + len(part)]
        if entry.dtype != "BF16":
            dest[...] = _as_working_float(part)
        elif wide is None:  # bf16 -> float32, in the output itself
            bits = dest.view(np.uint32)
            bits[...] = part
            bits <<= 16
        else:  # bf16 -> float32 -> target
            bits = wide[: len(part)]
            bits[...] = part
            bits <<= 16
            dest[...] = bits.view(np.float32)
    return out


def _as_working_float(data: np.ndarray) -> np.ndarray:
    """What the exporter computes in: float16 and float32 as they are, anything else as float32."""
    return data if data.dtype in (np.float16, np.float32) else data.astype(np.float32)


# -- opening a checkpoint ---------------------------------------------------------


def resolve_checkpoint(spec: str | os.PathLike[str]) -> tuple[Path, str]:
    """A local directory, or a hub id fetched into (or found in) the HF cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, str(spec)
    if path.exists():
        raise CheckpointError(f"{spec} is a file; give the checkpoint directory (with config.json)")
    text = str(spec)
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return _download(text), text
    raise CheckpointError(f"checkpoint directory not found: {spec}")


def _download(repo: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id=repo,
                allow_patterns=_HUB_PATTERNS,
                cache_dir=constants.HF_HUB_CACHE,
                local_files_only=constants.is_offline_mode(),
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo} is not a local directory and is not in the Hugging Face cache (offline)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such repository on the Hugging Face hub") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"cannot fetch {repo} from the Hugging Face hub: {exc}") from None


def open_checkpoint(spec: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    path, source = resolve_checkpoint(spec)
    config = load_config(path)
    files, index = _weight_files(path)
    if files[0].suffix == ".bin":
        if not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled PyTorch weights ({files[0].name}), which can run code when "
                "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        return Checkpoint(path, config, _index_pickles(files), source, pickled=True)
    tensors = index_safetensors(files)
    if index is not None:
        _check_index(tensors, *index)
    return Checkpoint(path, config, tensors, source)


def read_json_object(file: Path, missing: str) -> dict[str, Any]:
    """A JSON object file, or CheckpointError: `missing` when it is absent, else what is wrong."""
    if not file.is_file():
        raise CheckpointError(missing)
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return value


def load_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    config = read_json_object(config_file, f"no config.json in {path}: not a Hugging Face model directory")
    if "text_config" in config and isinstance(config["text_config"], dict):
        config = {**config, **config["text_config"]}
    _refuse_quantized(config, config_file)
    return config


def _refuse_quantized(config: dict, config_file: Path) -> None:
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    # transformers writes quant_method "gguf" when it saved weights it dequantized from a GGUF:
    # the tensors on disk are plain floats.
    if method and method != "gguf":
        raise CheckpointError(
            f"{config_file.parent} holds {method}-quantized weights; export needs the original "
            "float weights (dequantize or merge them first)"
        )


# A sharded checkpoint's index: its file name and weight map (tensor name -> shard file name).
Index = tuple[str, dict[str, str]]


def _weight_files(path: Path) -> tuple[list[Path], Index | None]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            weight_map = _read_weight_map(path / index_name)
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(
                    f"{path} is incomplete: {index_name} names {missing[0]}{more}, which is missing"
                )
            return sorted(files), (index_name, weight_map)
    single = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if single:
        return single, None
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        return pickles, None
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a LoRA adapter, not a full model: merge it into its base model first")
    raise CheckpointError(f"no model weights in {path} (expected model.safetensors)")


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {index}: {_first_line(exc)}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"cannot read {index}: its weight_map is not a map of tensor names to files")
    return weight_map


def index_safetensors(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of these safetensors files, from their headers (each file validated; no data read)."""
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for entry in _safetensors_entries(file):
            if entry.name in tensors:
                raise CheckpointError(
                    f"tensor {entry.name} appears in two weight files: {tensors[entry.name].file.name} and {file.name}"
                )
            tensors[entry.name] = entry
    return tensors


def _check_index(tensors: dict[str, TensorEntry], index_name: str, weight_map: dict[str, str]) -> None:
    """Every tensor the index lists is in the shard it names (checked from the headers, no data read)."""
    for name, shard in weight_map.items():
        entry = tensors.get(name)
        if entry is None:
            raise CheckpointError(
                f"{index_name} places tensor {name} in {shard}, but no shard holds it: "
                "the index and the weight files disagree"
            )
        if entry.file.name != Path(shard).name:
            raise CheckpointError(
                f"{index_name} places tensor {name} in {shard}, but {shard} does not hold it; "
                f"it is in {entry.file.name}: the index and the weight files disagree"
            )


def _safetensors_entries(file: Path) -> Iterator[TensorEntry]:
    from safetensors import safe_open

    try:
        # Validates the header and that the tensor data covers the whole file.
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type (and OSError)
        raise CheckpointError(f"{file.name} is truncated or corrupt ({_first_line(exc)})") from None
    header, data_start = _read_header(file)
    for name in names:
        info = header[name]
        dtype = info["dtype"]
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file.name}: tensor {name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        yield TensorEntry(name, dtype, tuple(int(d) for d in info["shape"]), file, data_start + begin, end - begin)


def _read_header(file: Path) -> tuple[dict, int]:
    """The safetensors JSON header (already validated by safe_open) and where data starts."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _torch_load(file: Path) -> dict:
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or malicious file
        raise CheckpointError(f"cannot load {file.name} safely: {_first_line(exc)}") from None


def _index_pickles(files: list[Path]) -> dict[str, TensorEntry]:
    import torch

    tensors = {}
    for file in files:
        for name, tensor in _torch_load(file).items():
            if not isinstance(tensor, torch.Tensor):
                continue
            dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(tensor.dtype, "F64")
            tensors[name] = TensorEntry(name, dtype, tuple(tensor.shape), file)
    return tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
