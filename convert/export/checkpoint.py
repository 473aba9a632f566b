"""A Hugging Face checkpoint on disk: config.json, the weight files, one tensor at a time.

Safetensors is read without torch. `safetensors.safe_open` validates each file
(header, offsets, that the data covers the file: a truncated download fails
here, before any output exists) and lists its tensors. The data of one tensor
is then read from its byte range in the file, into memory it alone owns, and
freed once written: peak memory follows the largest tensor, not the model.
bfloat16, which numpy lacks, is widened to float32 exactly with bit shifts.

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

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 (bf16 widened), float16 or float64, in its stored shape."""
        entry = self.tensors[name]
        if self.pickled:
            return self._read_pickled(entry)
        try:
            with open(entry.file, "rb", buffering=0) as f:
                f.seek(entry.offset)
                raw = bytearray(entry.nbytes)
                if f.readinto(raw) != entry.nbytes:
                    raise CheckpointError(f"{entry.file.name} is truncated: tensor {name} is incomplete")
        except OSError as exc:
            raise CheckpointError(f"cannot read {entry.file}: {exc.strerror or exc}") from exc
        data = np.frombuffer(raw, dtype=_ST_DTYPES[entry.dtype]).reshape(entry.shape)
        if entry.dtype == "BF16":
            del raw
            return bf16_to_f32(data)  # the raw bytes are freed with `data` on return
        return data

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
    files = _weight_files(path)
    if files[0].suffix == ".bin":
        if not allow_pickle:
            raise CheckpointError(
                f"{path} has only pickled PyTorch weights ({files[0].name}), which can run code when "
                "loaded; convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        return Checkpoint(path, config, _index_pickles(files), source, pickled=True)
    return Checkpoint(path, config, _index_safetensors(files), source)


def load_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
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


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing[:3])}")
            return sorted(files)
    single = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if single:
        return single
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        return pickles
    if (path / "adapter_model.safetensors").is_file() or (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is a LoRA adapter, not a full model: merge it into its base model first")
    raise CheckpointError(f"no model weights in {path} (expected model.safetensors)")


def _index_safetensors(files: list[Path]) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for entry in _safetensors_entries(file):
            if entry.name in tensors:
                raise CheckpointError(f"tensor {entry.name} appears in two weight files")
            tensors[entry.name] = entry
    return tensors


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
