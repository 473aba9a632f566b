"""llama.cpp's importance matrix files: the GGUF format `llama-imatrix` writes, and its legacy `.dat`.

GGUF: per weight matrix NAME, an F32 tensor `NAME.in_sum2` [n_mat, n_cols]
(the sums of squared activations per input column, one row per expert) and
`NAME.counts` [n_mat, 1] (the rows summed); keys `general.type` = imatrix,
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`. The
importance of a column is sum / count. We add `alpaca_chat.imatrix.text_sha256`
(the calibration text's hash, so that an evaluation can refuse to be run on
it) and `alpaca_chat.imatrix.model_sha256`.

Reading is strict: the header goes through the same bounded parser as a model
file (a truncated or corrupted file is one line, never a crash), and every
entry must be a pair of finite F32 tensors of matching shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alpaca_chat.errors import ConversionError
from convert.imatrix_ggml import Collected

KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_TEXT_SHA256 = "alpaca_chat.imatrix.text_sha256"
KEY_MODEL_SHA256 = "alpaca_chat.imatrix.model_sha256"
_SUMS, _COUNTS = ".in_sum2", ".counts"


class ImatrixFileError(ConversionError):
    """Not a usable importance matrix file (missing, truncated, foreign, inconsistent)."""


@dataclass
class Imatrix:
    """Sums and counts per weight matrix, and what they were computed from."""

    data: Collected
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    text_sha256: str | None = None
    model_sha256: str | None = None

    def means(self) -> dict[str, np.ndarray]:
        """Per matrix, flat float32 [n_mat * n_cols]: mean squared activation per column, as the
        quantizer takes it (an expert that saw no token gets 1 everywhere, as llama-quantize does)."""
        out = {}
        for name, sums in self.data.sums.items():
            counts = self.data.counts[name].astype(np.float64)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(counts > 0, sums / counts, 1.0)
            out[name] = values.reshape(-1).astype(np.float32)
        return out

    def partial_entries(self) -> list[str]:
        """Matrices some of whose experts saw no token (the calibration text never routed there)."""
        return sorted(name for name, counts in self.data.counts.items() if (counts == 0).any())


def write_imatrix(imatrix: Imatrix, path: str | os.PathLike[str]) -> Path:
    """Write `imatrix` as llama.cpp's imatrix GGUF, atomically (temp file, fsync, rename)."""
    import gguf

    from convert.atomic import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file has none
        writer.add_string(KEY_TYPE, "imatrix")
        writer.add_array(KEY_DATASETS, list(imatrix.datasets) or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        if imatrix.text_sha256:
            writer.add_string(KEY_TEXT_SHA256, imatrix.text_sha256)
        if imatrix.model_sha256:
            writer.add_string(KEY_MODEL_SHA256, imatrix.model_sha256)
        for name in sorted(imatrix.data.sums):  # llama-imatrix's order: sorted by name
            sums = imatrix.data.sums[name].astype(np.float32)
            counts = imatrix.data.counts[name].astype(np.float32).reshape(-1, 1)
            writer.add_tensor(name + _SUMS, np.ascontiguousarray(sums))
            writer.add_tensor(name + _COUNTS, np.ascontiguousarray(counts))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix GGUF or legacy `.dat`; ImatrixFileError (one line) for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImatrixFileError(f"cannot read the importance matrix {path}: {exc.strerror or exc}") from None
    try:
        imatrix = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except ImatrixFileError:
        raise
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise ImatrixFileError(f"{path} is not a valid importance matrix: {exc}") from None
    if not imatrix.data.sums:
        raise ImatrixFileError(f"{path} contains no importance data")
    for name, sums in imatrix.data.sums.items():
        if not np.all(np.isfinite(sums)):
            raise ImatrixFileError(f"{path}: the importance data of {name} is not finite")
        if (imatrix.data.counts[name] < 0).any():
            raise ImatrixFileError(f"{path}: {name} has a negative count")
    return imatrix


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    from alpaca_chat.errors import InvalidModelFileError, ModelNotFoundError
    from alpaca_chat.gguf_parse import parse_file

    try:
        parsed = parse_file(path)  # bounded: truncation and corrupted headers are typed one-line errors
    except (InvalidModelFileError, ModelNotFoundError) as exc:
        raise ImatrixFileError(f"{path} is not a valid importance matrix: {_after_name(str(exc), path)}") from None
    md = parsed.metadata
    shapes = {t.name: (t.shape, t.ggml_type) for t in parsed.tensors}
    bases = {name[: -len(_SUMS)] for name in shapes if name.endswith(_SUMS)}
    model_file = md.get("general.architecture", "imatrix") != "imatrix" or md.get(KEY_TYPE, "imatrix") != "imatrix"
    if model_file or (not bases and shapes):
        raise ImatrixFileError(f"{path} is a model file, not an importance matrix (make one with alpaca-convert imatrix)")
    if not bases:
        raise ImatrixFileError(f"{path} contains no importance data")
    for base in sorted(bases):
        if base + _COUNTS not in shapes:
            raise ImatrixFileError(f"{path}: {base} has sums but no counts")
        (sum_shape, sum_type), (count_shape, count_type) = shapes[base + _SUMS], shapes[base + _COUNTS]
        if sum_type != 0 or count_type != 0:
            raise ImatrixFileError(f"{path}: the sums and counts of {base} must be F32")
        n_mat = int(np.prod(count_shape))
        # [n_cols, n_mat]; llama-imatrix's writer drops a trailing 1, so one matrix may be [n_cols]
        rows = sum_shape[1] if len(sum_shape) == 2 else 1 if len(sum_shape) == 1 else -1
        if rows != n_mat or not sum_shape[0]:
            raise ImatrixFileError(f"{path}: {base} has {list(sum_shape)} sums for {n_mat} counts")
    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    data = Collected()
    for base in sorted(bases):
        counts = tensors[base + _COUNTS].reshape(-1)
        data.sums[base] = tensors[base + _SUMS].reshape(len(counts), -1).astype(np.float64)
        data.counts[base] = np.rint(counts).astype(np.int64)
    datasets = md.get(KEY_DATASETS)
    return Imatrix(
        data,
        chunk_count=int(md.get(KEY_CHUNK_COUNT) or 0),
        chunk_size=int(md.get(KEY_CHUNK_SIZE) or 0),
        datasets=_strings(reader, KEY_DATASETS) if datasets is None else list(datasets),
        text_sha256=md.get(KEY_TEXT_SHA256),
        model_sha256=md.get(KEY_MODEL_SHA256),
    )


def _strings(reader, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _after_name(message: str, path: Path) -> str:
    """The parser's reason without the file name it starts with ("X is truncated" -> "the file is truncated")."""
    for prefix in (f"{path}: ", f"{path} "):
        if message.startswith(prefix):
            reason = message[len(prefix):]
            return f"the file {reason}" if reason.split(" ", 1)[0] in ("is", "has") else reason
    return message


def _read_legacy(path: Path) -> Imatrix:
    """The `.dat` llama-imatrix wrote before GGUF: entries of (name, ncall, values averaged * ncall)."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str, count: int = 1) -> np.ndarray:
        nonlocal pos
        size = np.dtype(fmt).itemsize * count
        if pos + size > len(raw):
            raise ValueError("the file ends inside an entry")
        values = np.frombuffer(raw, dtype=fmt, count=count, offset=pos)
        pos += size
        return values

    n_entries = int(take("<i4")[0])
    if not 0 < n_entries < 1 << 20:
        raise ValueError(f"bad entry count {n_entries}")
    data = Collected()
    for _ in range(n_entries):
        name_len = int(take("<i4")[0])
        if not 0 < name_len < 1024:
            raise ValueError(f"bad name length {name_len}")
        name = take("u1", name_len).tobytes().decode("utf-8")
        ncall = int(take("<i4")[0])
        nval = int(take("<i4")[0])
        if not 0 < nval < 1 << 28:
            raise ValueError(f"bad value count {nval} for {name}")
        values = take("<f4", nval).astype(np.float64)
        # Stored as mean * ncall: as sums over `ncall` rows they read back as the same means.
        data.sums[name] = values.reshape(1, -1)
        data.counts[name] = np.array([ncall if ncall > 0 else 1], dtype=np.int64)  # ncall 0: stored as is
    chunk_count, datasets = 0, []
    if pos < len(raw):  # optional trailer: the chunk count, then optionally the dataset's name
        chunk_count = int(take("<i4")[0])
        if pos < len(raw):
            length = int(take("<i4")[0])
            if not 0 <= length < 1 << 16:
                raise ValueError(f"bad dataset name length {length}")
            datasets = [take("u1", length).tobytes().decode("utf-8", errors="replace")] if length else []
    if pos != len(raw):
        raise ValueError(f"{len(raw) - pos} unexpected bytes at the end")
    return Imatrix(data, chunk_count=chunk_count, datasets=datasets)
