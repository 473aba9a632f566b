"""Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`, via llama-cpp-python).

No quantization code of our own: the bytes are the ones llama.cpp's
`llama-quantize` would write with the same input, type and importance matrix.
We add what the C API leaves to its callers: the type table, an early
check that the input is a sound GGUF and that types needing an importance
matrix get one, the importance matrix (a file, or `auto`: computed once by
`convert.imatrix` and cached by the model's hash), checked against the model
before anything is written, tensors kept at a higher type (`--keep-tensor
PATTERN=TYPE`, llama.cpp's tensor type overrides), a progress callback fed from
llama.cpp's log, provenance metadata, and an atomic output file.

The quantizer runs in a worker thread so that Ctrl+C is handled at once: the
temp file is removed and the half-written data never gets a `.gguf` name.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_chat import gguf_check
from alpaca_chat.errors import ConversionError, UsageError
from convert import provenance
from convert.atomic import atomic_output, check_writable
from convert.imatrix_file import Imatrix, ImatrixFileError, read_imatrix


class QuantizeError(ConversionError):
    """Unknown type, missing importance matrix, or llama.cpp refused the input."""


class UnknownQuantTypeError(QuantizeError):
    """A type name llama.cpp does not offer: a bad flag value, hence a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype (llama.h)
    description: str
    needs_imatrix: bool = False


# llama.cpp's quantization types, as `llama-quantize` lists them (tools/quantize).
# ftype values are llama.h's `enum llama_ftype`, a stable part of its ABI.
_TYPES: tuple[QuantType, ...] = (
    QuantType("Q1_0", 40, "1.125 bpw"),
    QuantType("Q2_0", 41, "2.25 bpw (group 64)"),
    QuantType("Q4_0", 2, "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", 3, "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("MXFP4_MOE", 38, "MXFP4 for mixture-of-experts tensors"),
    QuantType("Q5_0", 8, "5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", 9, "5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ2_XXS", 19, "2.06 bpw", needs_imatrix=True),
    QuantType("IQ2_XS", 20, "2.31 bpw", needs_imatrix=True),
    QuantType("IQ2_S", 28, "2.5 bpw", needs_imatrix=True),
    QuantType("IQ2_M", 29, "2.7 bpw", needs_imatrix=True),
    QuantType("IQ1_S", 24, "1.56 bpw", needs_imatrix=True),
    QuantType("IQ1_M", 31, "1.75 bpw", needs_imatrix=True),
    QuantType("TQ1_0", 36, "1.69 bpw ternarization"),
    QuantType("TQ2_0", 37, "2.06 bpw ternarization"),
    QuantType("Q2_K", 10, "2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q2_K_S", 21, "2.96G, +3.1836 ppl @ Llama-3-8B", needs_imatrix=True),
    QuantType("IQ3_XXS", 23, "3.06 bpw", needs_imatrix=True),
    QuantType("IQ3_S", 26, "3.44 bpw"),
    QuantType("IQ3_M", 27, "3.66 bpw mix"),
    QuantType("IQ3_XS", 22, "3.3 bpw"),
    QuantType("Q3_K_S", 11, "3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", 12, "3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", 13, "4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", 25, "4.50 bpw non-linear"),
    QuantType("IQ4_XS", 30, "4.25 bpw non-linear"),
    QuantType("Q4_K_S", 14, "4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", 15, "4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K_S", 16, "5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", 17, "5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", 18, "6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", 7, "7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("F16", 1, "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", 32, "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", 0, "26.00G @ 7B"),
)
QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

Progress = Callable[[int, int, str], None]
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


def parse_quant_type(name: str) -> QuantType:
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise UnknownQuantTypeError(f"unknown quantization type {name!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[key]


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    quant_type: str
    input_bytes: int
    output_bytes: int
    seconds: float


def quantize(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    quant_type: str,
    *,
    imatrix: str | os.PathLike[str] | None = None,
    keep_tensors: Sequence[str] = (),
    allow_requantize: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize the GGUF `input` to `quant_type`, writing `output` atomically.

    `imatrix`: an importance matrix file, or "auto" (computed on `input` with the
    built-in calibration text the first time, then taken from the cache).
    `keep_tensors`: "PATTERN=TYPE" items; tensors whose name the regular
    expression matches are stored as TYPE (a ggml type such as Q8_0 or F16).
    `allow_requantize`: accept an already quantized input (llama-quantize's
    --allow-requantize; the result carries both roundings).
    """
    qtype = parse_quant_type(quant_type)
    if qtype.needs_imatrix and imatrix is None:
        raise QuantizeError(
            f"{qtype.name} needs an importance matrix: pass --imatrix auto (or a file made by "
            "alpaca-convert imatrix), or choose a K-quant such as Q4_K_M"
        )
    input, output = Path(input), Path(output)
    info = gguf_check.check_gguf(input)  # a corrupt file gets a one-line error, not a crash in C++
    check_writable(output)
    if output.exists() and output.resolve() == input.resolve():
        raise QuantizeError(f"the output {output} would overwrite the input")
    overrides = parse_keep_tensors(keep_tensors, info)
    if imatrix is not None and str(imatrix) == "auto":
        from convert.imatrix import auto_imatrix

        imatrix = auto_imatrix(input, threads=threads)
    loaded = _load_checked(imatrix, info) if imatrix is not None else None

    started = time.perf_counter()
    with atomic_output(output) as tmp:
        _run_quantizer(input, tmp, qtype, loaded, imatrix, overrides, allow_requantize, threads, progress)
    return QuantizeResult(output, qtype.name, input.stat().st_size, output.stat().st_size, time.perf_counter() - started)


def _run_quantizer(input, tmp, qtype, loaded, imatrix_path, overrides, requantize, threads, progress) -> None:
    import llama_cpp

    from convert import llama_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads or _cores()
    params.allow_requantize = requantize
    keep = []  # ctypes buffers that must outlive the call
    if loaded is not None:
        params.imatrix = _imatrix_array(loaded.means(), keep)
    if overrides:
        params.tt_overrides = _tensor_overrides(overrides, keep)
    params.kv_overrides = _kv_overrides(qtype, imatrix_path, loaded, keep)

    errors: list[str] = []

    def on_log(level: int, text: str) -> None:
        if level == llama_log.LEVEL_ERROR and text.strip():
            errors.append(text.strip())
        elif progress is not None and (match := _TENSOR_LINE.search(text)):
            progress(int(match.group(1)), int(match.group(2)), match.group(3))

    outcome: dict = {}

    def work() -> None:
        try:
            outcome["status"] = llama_cpp.llama_model_quantize(
                str(input).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    with llama_log.listening(on_log):
        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)  # short waits: Ctrl+C reaches this thread
    if "error" in outcome:
        raise outcome["error"]
    if outcome.get("status") != 0:
        raise QuantizeError(f"llama.cpp could not quantize {input.name} to {qtype.name}: {_reason(errors)}")


def _reason(errors: list[str]) -> str:
    for line in reversed(errors):
        text = line.split("failed to quantize:", 1)[-1].strip()
        if text and not set(text) <= set("=\n "):
            return text.splitlines()[0]
    return "see --verbose for llama.cpp's log"


def _cores() -> int:
    from alpaca_chat.engine import physical_cores

    return physical_cores()


KEY_IMATRIX_TEXT = "quantize.imatrix.text_sha256"  # ours: lets an evaluation refuse the calibration text


def _kv_overrides(qtype: QuantType, imatrix_path, loaded: Imatrix | None, keep: list):
    """general.* provenance (and the imatrix facts llama-quantize records), as llama.cpp KV overrides."""
    import llama_cpp

    values: list[tuple[str, str | int]] = [
        (provenance.KEY_QUANT_TYPE, qtype.name),
        (provenance.KEY_CONVERTER, provenance.converter_version()),
    ]
    if loaded is not None:
        values += [
            ("quantize.imatrix.file", Path(imatrix_path).name),
            ("quantize.imatrix.entries_count", len(loaded.data.sums)),
            ("quantize.imatrix.chunks_count", loaded.chunk_count),
        ]
        if loaded.datasets:
            values.append(("quantize.imatrix.dataset", loaded.datasets[0]))
        if loaded.text_sha256:
            values.append((KEY_IMATRIX_TEXT, loaded.text_sha256))
    array = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(array, values):
        item.key = key.encode()[:127]
        if isinstance(value, int):
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            item.value.val_i64 = value
        else:
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            item.value.val_str = value.encode()[:127]
    array[len(values)].key = b""  # terminator
    keep.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_kv_override))


# -- importance matrix ------------------------------------------------------------


def load_imatrix(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Per-tensor importance (mean squared activations) from an imatrix file (GGUF or legacy .dat)."""
    try:
        return read_imatrix(path).means()
    except ImatrixFileError as exc:
        raise QuantizeError(str(exc)) from None


def _load_checked(path, info: gguf_check.GGUFInfo) -> Imatrix:
    """The imatrix at `path`, refused unless it was made for this model's weight matrices.

    llama.cpp skips a tensor whose name it does not find and aborts on a size
    mismatch halfway through the output; a foreign file is refused here instead,
    before anything is written.
    """
    try:
        loaded = read_imatrix(path)
    except ImatrixFileError as exc:
        raise QuantizeError(str(exc)) from None
    shapes = {t.name: t.shape for t in _tensors(info.path)}
    model = info.path.name
    covered = 0
    for name, values in loaded.means().items():
        if name not in shapes:
            raise QuantizeError(f"{path} is not an importance matrix of {model}: it has {name}, which {model} has not")
        shape = shapes[name]
        size = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if values.size != size:
            raise QuantizeError(
                f"{path} is not an importance matrix of {model}: {values.size} values for {name}, which takes {size}"
            )
        covered += 1
    if not covered:
        raise QuantizeError(f"{path} has no entry for any weight of {model}")
    return loaded


def _tensors(path: Path):
    from alpaca_chat.gguf_parse import parse_file

    return parse_file(path).tensors


# -- tensors kept at a higher type -------------------------------------------------


def parse_keep_tensors(items: Sequence[str], info: gguf_check.GGUFInfo | None = None) -> list[tuple[str, int]]:
    """"PATTERN=TYPE" -> (regular expression, ggml type). With `info`, every pattern must match a tensor."""
    import gguf

    overrides = []
    names = [t.name for t in _tensors(info.path)] if info is not None else []
    for item in items:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern or not type_name:
            raise UsageError(f"--keep-tensor wants PATTERN=TYPE (e.g. attn_v=Q8_0), not {item!r}")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--keep-tensor: {pattern!r} is not a regular expression: {exc}") from None
        try:
            ggml_type = gguf.GGMLQuantizationType[type_name.strip().upper()]
        except KeyError:
            known = ", ".join(t.name for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64"))
            raise UsageError(f"--keep-tensor: unknown tensor type {type_name!r}; choose one of: {known}") from None
        if info is not None and not any(regex.search(name) for name in names):
            raise UsageError(f"--keep-tensor: {pattern!r} matches no tensor of {info.path.name}")
        overrides.append((pattern, int(ggml_type)))
    return overrides


def _tensor_overrides(overrides: list[tuple[str, int]], keep: list):
    import llama_cpp

    array = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for item, (pattern, ggml_type) in zip(array, overrides):
        encoded = pattern.encode()
        keep.append(encoded)
        item.pattern = encoded
        item.type = ggml_type
    array[len(overrides)].pattern = None  # terminator
    keep.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_tensor_override))


def _imatrix_array(matrix: dict[str, np.ndarray], keep: list):
    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
    for item, (name, values) in zip(array, matrix.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(values)
        encoded = name.encode()
        keep.append(encoded)
        item.name = encoded
        item.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        item.size = values.size
    array[len(matrix)].name = None  # terminator
    keep.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
