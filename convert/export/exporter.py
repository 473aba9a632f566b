"""Hugging Face checkpoint -> GGUF, streaming one tensor at a time.

The order is fixed by gguf's `GGUFWriter` state machine: every tensor's name,
shape and type must be in the header before any data is written. So export
runs in two passes over the checkpoint: a plan (names, shapes and types from
the safetensors headers, no data read), then the data, tensor by tensor:
read, convert, write, free.

Casting follows llama.cpp's converter so both produce the same bytes:
bf16 is widened to f32 exactly; 1-D tensors, norms and biases stay F32;
weight matrices take the output type (F16 by `astype`, BF16 and Q8_0 by
gguf's reference quantizers; a Q8_0 tensor whose rows do not divide into
32-element blocks falls back to F16).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError, UsageError
from convert import provenance
from convert.atomic import atomic_output, check_writable
from convert.export.base import ArchModel, CombinedTensor
from convert.export.checkpoint import Checkpoint, open_checkpoint
from convert.export.registry import model_class_for

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

Progress = Callable[[int, int, str], None]

# Matrices llama.cpp's converter keeps in F32 whatever the output type: MoE routers.
# Kept F32 whatever the outtype, as llama.cpp's converter does: routers, and the small convolution
# kernels of SSM / gated DeltaNet (ssm_conv1d) and LFM2 (shortconv.conv) layers.
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight", "shortconv.conv.weight")


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: Q
    source: str | None  # checkpoint tensor name, or None for a computed or combined tensor
    data: np.ndarray | None = None  # computed tensors only
    combined: CombinedTensor | None = None  # tensors assembled from several (e.g. stacked experts)

    @property
    def nbytes(self) -> int:
        block_size, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = 1
        for d in self.shape:
            n *= d
        return n // block_size * type_size


@dataclass(frozen=True)
class ExportResult:
    path: Path
    architecture: str  # the HF name
    outtype: str
    n_tensors: int
    n_params: int
    n_bytes: int
    seconds: float


def output_settings(outtype: str, output: str | os.PathLike[str]) -> tuple[Q, gguf.LlamaFileType, Path]:
    """The tensor and file type of an `outtype` (UsageError if unknown), and `output` checked writable."""
    if outtype.lower() not in OUTTYPES:
        raise UsageError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    qtype, file_type = OUTTYPES[outtype.lower()]
    output = Path(output)
    check_writable(output)
    return qtype, file_type, output


def export(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    allow_pickle: bool = False,
    chat_template: str | None = None,
    pre_tokenizer: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Convert a checkpoint directory (or hub id) to one GGUF file at `output`."""
    started = time.perf_counter()
    qtype, file_type, output = output_settings(outtype, output)
    ckpt = open_checkpoint(checkpoint, allow_pickle=allow_pickle)
    model = model_class_for(ckpt.config)(ckpt, pre_tokenizer=pre_tokenizer)
    plan = plan_tensors(model, qtype)
    writer = gguf.GGUFWriter(None, model.arch_name)
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    _set_metadata(writer, model, file_type, outtype.upper(), chat_template)

    with atomic_output(output) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, tensor in enumerate(plan):
                writer.write_tensor_data(produce(model, tensor))
                if progress is not None:
                    progress(i + 1, len(plan), tensor.name)
        finally:
            writer.close()
    return ExportResult(
        path=output,
        architecture=ckpt.architecture,
        outtype=outtype.lower(),
        n_tensors=len(plan),
        n_params=_n_params(plan),
        n_bytes=output.stat().st_size,
        seconds=time.perf_counter() - started,
    )


def plan_tensors(model: ArchModel, qtype: Q) -> list[PlannedTensor]:
    plan: list[PlannedTensor] = []
    order = _ordered(model.checkpoint)
    combined_at = _combined_by_first_source(model, order)
    consumed = {source for group in combined_at.values() for c in group for source in c.sources}
    for name in order:
        if model.skip_tensor(name):
            continue
        entry = model.checkpoint.tensors[name]
        if entry.dtype not in ("F64", "F32", "F16", "BF16"):
            raise ConversionError(
                f"tensor {name} has integer dtype {entry.dtype}: quantized checkpoints are not supported"
            )
        for combined in combined_at.get(name, ()):
            shape = combined.shape(entry.shape)
            qtype_of = tensor_qtype(combined.name, shape, qtype)
            plan.append(PlannedTensor(combined.name, shape, qtype_of, None, combined=combined))
        if name in consumed:
            continue
        gguf_name = model.gguf_name(name)
        model.check_shape(name, gguf_name, entry.shape)
        plan.append(PlannedTensor(gguf_name, entry.shape, tensor_qtype(gguf_name, entry.shape, qtype), name))
    for gguf_name, data in model.extra_tensors():
        plan.append(PlannedTensor(gguf_name, data.shape, tensor_qtype(gguf_name, data.shape, qtype), None, data))
    seen: set[str] = set()
    for tensor in plan:
        if tensor.name in seen:
            raise ConversionError(f"two checkpoint tensors map to {tensor.name}")
        seen.add(tensor.name)
    model.check_tensors(seen)
    return plan


def _combined_by_first_source(model: ArchModel, order: list[str]) -> dict[str, list[CombinedTensor]]:
    """The model's combined tensors, each planned where its first source comes in the checkpoint."""
    position = {name: i for i, name in enumerate(order)}
    at: dict[str, list[CombinedTensor]] = {}
    for combined in model.combined_tensors():
        at.setdefault(min(combined.sources, key=position.__getitem__), []).append(combined)
    return at


def _ordered(ckpt: Checkpoint) -> list[str]:
    """Checkpoint order (file by file, by offset): reads sweep each file once, front to back."""
    return sorted(ckpt.tensors, key=lambda n: (str(ckpt.tensors[n].file), ckpt.tensors[n].offset, n))


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """The GGUF type of one tensor: F32 for vectors, norms, biases and routers; else the output type."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if gguf_name.endswith(_ALWAYS_F32):
        return Q.F32
    if wanted in (Q.Q8_0, Q.BF16):
        block_size = gguf.GGML_QUANT_SIZES[wanted][0]
        if shape[-1] % block_size:
            return Q.F16
    return wanted


def produce(model: ArchModel, tensor: PlannedTensor) -> np.ndarray:
    """One tensor's bytes as they go into the file."""
    if tensor.data is not None:
        data = tensor.data
    elif tensor.combined is not None:
        data = _assemble(model, tensor.combined, tensor.qtype)
    else:
        narrow = tensor.qtype == Q.F16 and model.moves_values_only(tensor.source, tensor.name)
        data = model.checkpoint.read(tensor.source, np.float16 if narrow else None)  # F16 as read: no f32 copy
        if data.dtype not in (np.float16, np.float32):
            data = data.astype(np.float32)
        data = model.modify_tensor(tensor.source, tensor.name, data)
    out = gguf.quants.quantize(data, tensor.qtype)
    del data  # before the copy below, if one is needed
    return np.ascontiguousarray(out)


def _assemble(model: ArchModel, combined: CombinedTensor, qtype: Q) -> np.ndarray:
    """A combined tensor, source by source. For F16 output each source is narrowed as it is
    read (the same values as a float32 read then cast): no float32 copy of the whole exists."""
    if qtype == Q.F16:
        return combined.assemble(lambda source: model.checkpoint.read(source, np.float16), np.dtype(np.float16))
    stored = {model.checkpoint.tensors[source].dtype for source in combined.sources}
    dtype = np.float16 if stored == {"F16"} else np.float32  # as a single tensor is read
    return combined.assemble(model.checkpoint.read, np.dtype(dtype))


def _n_params(plan: list[PlannedTensor]) -> int:
    total = 0
    for tensor in plan:
        n = 1
        for d in tensor.shape:
            n *= d
        total += n
    return total


def _set_metadata(
    writer: gguf.GGUFWriter,
    model: ArchModel,
    file_type: gguf.LlamaFileType,
    type_label: str,
    chat_template: str | None,
) -> None:
    ckpt = model.checkpoint
    writer.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.path, None, total)
    if meta.name is None:
        meta.name = ckpt.path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(writer)
    model.set_parameters(writer)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    model.set_vocab(writer, chat_template)
    writer.add_string(provenance.KEY_SOURCE, _source_label(ckpt))
    writer.add_string(provenance.KEY_CONVERTER, provenance.converter_version())
    writer.add_string(provenance.KEY_QUANT_TYPE, type_label)
    base_gguf = _base_gguf(ckpt.path)
    if base_gguf:
        writer.add_string(provenance.KEY_BASE_GGUF, base_gguf)


def _base_gguf(path: Path) -> str | None:
    """'NAME.Q4_1.gguf (98362432 bytes, sha256 of head and tail 747cb1f0...)' for a model
    fine-tuned from a dequantized GGUF; None otherwise."""
    from convert.gguf_base import read_provenance

    recorded = read_provenance(path)
    if not recorded or "gguf" not in recorded:
        return None
    return f"{recorded['gguf']} ({recorded.get('size')} bytes, sha256 of head and tail {recorded.get('sha256_head_tail')})"


def _source_label(ckpt: Checkpoint) -> str:
    """The hub id the user gave, or the directory's name (not its full path: no user names in files)."""
    return ckpt.path.resolve().name if Path(ckpt.source).is_dir() else ckpt.source
