"""peft LoRA adapter -> llama.cpp's LoRA adapter GGUF, through the exporter's own tensor names and transforms.

    export_adapter(adapter_dir, out, outtype="f16", base=None) -> AdapterExportResult

A LoRA update B @ A (scaled) adds to a base weight W [out, in]. The exporter does not
always write W as it is: the adapter must describe the update of the tensor the base
GGUF holds, so each module goes through what the base's export does to its weight:
- its GGUF name comes from the family's `gguf_name` (gguf's tensor-name map);
- a family transform of W's rows (Llama's rope permutation of q/k) is the same
  transform of B's rows, A unchanged; a transform of W's columns (Qwen3.5's regrouped
  value heads at out_proj's input) is the same transform of A's columns. An overridden
  `modify_tensor` is trusted only after a probe shows it is one or the other
  (f(B @ A) == f(B) @ A, or == B @ f(A)), else the module is refused;
- a fused tensor the exporter cuts into row blocks (CombinedTensor parts) cuts B's rows;
  tensors it stacks (a mixture's experts) are refused; fused tensors it keeps whole
  (Phi-3's qkv_proj, gate_up_proj) are one pair, like any other;
- token embeddings: llama.cpp reads token_embd's pair flipped (lora_a = A.T [vocab, r],
  lora_b = B [hidden, r]; see its build_inp_embd). A model whose output head *is* its
  embedding matrix (tied) is refused for an embedding or head LoRA: llama.cpp would apply
  the embedding's pair to the head as a matrix product, in the flipped layout.
llama.cpp scales every pair by alpha / (that pair's rank), one alpha per file. The file's
alpha is peft's (times sqrt(r) for rsLoRA, whose scale is alpha / sqrt(r)); a module whose
peft scale differs from alpha / rank (alpha_pattern, rsLoRA with rank_pattern) has the
ratio folded into its lora_b. Tensor types follow llama.cpp's convert_lora_to_gguf.py, so
both write the same bytes (tests/test_export_adapter.py compares them).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError, UsageError
from convert import provenance
from convert.atomic import atomic_output
from convert.export.adapter_files import AdapterError, LoraPair, PeftAdapter, read_adapter
from convert.export.base import ArchModel, CombinedTensor
from convert.export.checkpoint import CheckpointError, open_checkpoint
from convert.export.exporter import Progress, output_settings
from convert.export.registry import model_class_for

Q = gguf.GGMLQuantizationType
_MERGE_INSTEAD = "merge the adapter into the base instead (alpaca-convert merge)"
_TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


@dataclass(frozen=True)
class PlannedPair:
    """One lora_a/lora_b pair of the output file."""

    gguf_name: str  # the base GGUF tensor it adapts (blk.0.attn_q.weight)
    source: str  # the base checkpoint's tensor of the module
    pair: LoraPair
    factor: float  # folded into lora_b: the module's peft scale over the file's alpha / rank
    rows: CombinedTensor | None = None  # the block of B's rows this tensor takes, if the exporter cuts W
    transform: str = ""  # "rows": B goes through the family's modify_tensor; "columns": A does

    @property
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(lora_a, lora_b) shapes as written (numpy order)."""
        (r, inp), (out, _) = self.pair.a.shape, self.pair.b.shape
        if self.rows is not None:
            out = self.rows.shape((out, r))[0]
        return ((inp, r), (out, r)) if self.pair.embedding else ((r, inp), (out, r))


@dataclass(frozen=True)
class AdapterExportResult:
    path: Path
    architecture: str  # the base's HF name
    base: str
    outtype: str
    n_pairs: int
    alpha: float  # adapter.lora.alpha as written
    ranks: tuple[int, ...]  # the distinct ranks
    n_bytes: int
    seconds: float


def export_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    outtype: str = "f16",
    *,
    base: str | None = None,
    progress: Progress | None = None,
) -> AdapterExportResult:
    """Write the peft adapter in `adapter_dir` as a llama.cpp LoRA adapter GGUF at `output`."""
    started = time.perf_counter()
    qtype, file_type, output = output_settings(outtype, output)
    adapter = read_adapter(adapter_dir)
    base_spec = base or adapter.base
    if not base_spec:
        raise UsageError(f"{adapter.path.name}/adapter_config.json names no base model; pass --base")
    model = _base_model(base_spec)
    alpha = file_alpha(adapter)
    plan = plan_adapter(model, adapter, alpha)

    writer = gguf.GGUFWriter(None, model.arch_name)
    for p in plan:
        for half, shape in zip(("a", "b"), p.shapes):
            wanted = lora_qtype(shape, qtype)
            writer.add_tensor_info(f"{p.gguf_name}.lora_{half}", shape, np.dtype(np.float32), _nbytes(shape, wanted),
                                   raw_dtype=wanted)
    _set_metadata(writer, adapter, model, alpha, file_type, outtype.upper(), base_spec)
    _write(writer, output, model, adapter, plan, qtype, progress)
    return AdapterExportResult(
        path=output,
        architecture=model.checkpoint.architecture,
        base=base_spec,
        outtype=outtype.lower(),
        n_pairs=len(plan),
        alpha=alpha,
        ranks=tuple(sorted({p.pair.rank for p in plan})),
        n_bytes=output.stat().st_size,
        seconds=time.perf_counter() - started,
    )


def _write(writer: gguf.GGUFWriter, output: Path, model: ArchModel, adapter: PeftAdapter, plan: list[PlannedPair],
           qtype: Q, progress: Progress | None) -> None:
    """Header, then each pair's data in the planned order; staged beside `output`, fsynced, renamed."""
    with atomic_output(output) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for i, p in enumerate(plan):
                for data, shape in zip(pair_data(model, adapter, p), p.shapes):
                    writer.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(data, lora_qtype(shape, qtype))))
                if progress is not None:
                    progress(i + 1, len(plan), p.gguf_name)
        finally:
            writer.close()


def _base_model(spec: str) -> ArchModel:
    """The base's exporter model: a checkpoint directory or hub id, or a GGUF (a path or an alpaca-chat
    model name) through the checkpoint a fine-tune on it dequantized it into (convert/gguf_base.py)."""
    from convert import gguf_base

    try:
        if gguf_base.is_gguf_spec(spec):
            spec = str(gguf_base.checkpoint_from_gguf(spec))  # cached by the fine-tune; else dequantized now
        ckpt = open_checkpoint(spec)
    except CheckpointError as exc:
        raise CheckpointError(f"base model: {exc}") from None
    except ImportError as exc:  # dequantizing needs torch and transformers
        raise UsageError(
            f"base model {spec} is a GGUF not dequantized yet, which needs the 'convert' extra ({exc.name})"
        ) from None
    return model_class_for(ckpt.config)(ckpt)


def file_alpha(adapter: PeftAdapter) -> float:
    """adapter.lora.alpha: llama.cpp's scale alpha / r must be peft's (alpha / sqrt(r) with rsLoRA)."""
    return adapter.alpha * math.sqrt(adapter.rank) if adapter.rslora else adapter.alpha


def lora_qtype(shape: tuple[int, ...], wanted: Q) -> Q:
    """A LoRA matrix's type, as llama.cpp's converter picks it: the output type, F16 where Q8_0's
    32-value blocks do not divide a row (a rank-8 lora_b)."""
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return wanted


# -- the plan: every module through the base's export ------------------------------


def plan_adapter(model: ArchModel, adapter: PeftAdapter, alpha: float) -> list[PlannedPair]:
    """Each adapter module as the pair(s) llama.cpp needs; refuses what it cannot apply, naming the module."""
    cut_by = _combined_by_source(model)
    by_gguf = _checkpoint_names_by_gguf_name(model)
    plan: list[PlannedPair] = []
    probed: dict[tuple, bool] = {}
    for pair in adapter.pairs:
        name = _source_of(model, adapter, pair, by_gguf)
        _check_against_base(model, pair, name)
        factor = _factor(adapter, pair, alpha)
        if name in cut_by:
            plan += _cut_pairs(pair, name, cut_by[name], factor)
            continue
        gguf_name = model.gguf_name(name)
        if pair.embedding:
            _check_embedding(model, pair, name, gguf_name)
            plan.append(PlannedPair(gguf_name, name, pair, factor))
            continue
        transform = _transform_of(model, name, gguf_name, pair, probed)
        if transform is None:
            raise AdapterError(
                f"module {pair.module}: the {model.checkpoint.architecture} export transforms {name} in a way "
                f"a LoRA pair cannot follow; {_MERGE_INSTEAD}"
            )
        plan.append(PlannedPair(gguf_name, name, pair, factor, transform=transform))
    for name, entry in adapter.saved_base.items():
        base_entry = model.checkpoint.tensors.get(name)
        if base_entry is not None and base_entry.shape != entry.shape:
            raise AdapterError(
                f"{adapter.path.name} saved {name} at {list(entry.shape)}, but the base's is {list(base_entry.shape)}: "
                f"trained with a resized vocabulary? {_MERGE_INSTEAD}"
            )
    seen: set[str] = set()
    for p in plan:
        if p.gguf_name in seen:
            raise AdapterError(f"two adapter modules adapt the same GGUF tensor {p.gguf_name}")
        seen.add(p.gguf_name)
    return plan


def _checkpoint_names_by_gguf_name(model: ArchModel) -> dict[str, str]:
    """The base checkpoint's tensors by the GGUF name the exporter gives them."""
    names: dict[str, str] = {}
    for name in model.checkpoint.tensors:
        try:
            names.setdefault(model.gguf_name(name), name)
        except ConversionError:  # not a mapped tensor (experts, vision tower...)
            continue
    return names


def _source_of(model: ArchModel, adapter: PeftAdapter, pair: LoraPair, by_gguf: dict[str, str]) -> str:
    """The base checkpoint tensor a module adapts. peft names modules as the model holds them in memory,
    which is not always how the checkpoint stores them (transformers 5 saves Gemma 3's image-text model's
    model.language_model.* as language_model.model.*): where the names differ, the exporter's GGUF name,
    which both forms map to, finds the tensor."""
    name = pair.base_tensor
    if name in model.checkpoint.tensors:
        return name
    try:
        found = by_gguf.get(model.gguf_name(name))
    except ConversionError:
        found = None
    if found is None and model.tied_embeddings and name.endswith("lm_head.weight"):
        raise AdapterError(_tied_head(pair))
    if found is None:
        raise AdapterError(
            f"module {pair.module} of {adapter.path.name} is not in the base model {model.checkpoint.path.name} "
            f"(no tensor {name}): an adapter for another model? (--base names the right one)"
        )
    return found


def _check_against_base(model: ArchModel, pair: LoraPair, name: str) -> None:
    """The module has the sizes the pair says in the base, and the export writes it."""
    entry = model.checkpoint.tensors[name]
    rows, cols = entry.shape if len(entry.shape) == 2 else (-1, -1)
    if pair.embedding:
        fits = pair.a.shape[1] == rows and pair.b.shape[0] == cols
    else:
        fits = pair.a.shape[1] == cols and pair.b.shape[0] == rows
    if not fits:
        raise AdapterError(
            f"module {pair.module}: lora_A {list(pair.a.shape)} and lora_B {list(pair.b.shape)} do not fit the base's "
            f"{name} {list(entry.shape)}: an adapter for another model? (--base names the right one)"
        )
    if model.skip_tensor(name):
        if model.tied_embeddings and name.endswith("lm_head.weight"):
            raise AdapterError(_tied_head(pair))
        raise AdapterError(f"module {pair.module}: the GGUF export leaves {name} out, so nothing can adapt it")


def _tied_head(pair: LoraPair) -> str:
    return (
        f"module {pair.module}: this model's output head is its embedding matrix (tied), which llama.cpp "
        f"cannot adapt as a head; {_MERGE_INSTEAD}"
    )


def _check_embedding(model: ArchModel, pair: LoraPair, name: str, gguf_name: str) -> None:
    if gguf_name != _TOKEN_EMBD:
        raise AdapterError(f"module {pair.module}: an embedding LoRA on {gguf_name}; llama.cpp adapts only {_TOKEN_EMBD}")
    if model.tied_embeddings:
        raise AdapterError(
            f"module {pair.module}: this model ties its output head to the embeddings, and llama.cpp would apply "
            f"the embedding's LoRA to the head too, which it cannot; {_MERGE_INSTEAD}"
        )
    probe = np.random.default_rng(0).standard_normal((4, pair.b.shape[0])).astype(np.float32)
    moved = model.modify_tensor(name, gguf_name, probe)
    if moved.shape != probe.shape or not np.array_equal(moved, probe):
        raise AdapterError(f"module {pair.module}: the export changes the embeddings' values; {_MERGE_INSTEAD}")


def _cut_pairs(pair: LoraPair, name: str, combined: list[CombinedTensor], factor: float) -> list[PlannedPair]:
    """A module whose weight the exporter cuts into row blocks: one pair per block, B's rows cut alike."""
    stacked = [c for c in combined if c.stack]
    if stacked or pair.embedding:
        target = stacked[0].name if stacked else combined[0].name
        raise AdapterError(
            f"module {pair.module}: the export stacks this weight with others into {target}, which a LoRA pair "
            f"cannot adapt one part of; {_MERGE_INSTEAD}"
        )
    return [PlannedPair(c.name, name, pair, factor, rows=c) for c in combined]


def _combined_by_source(model: ArchModel) -> dict[str, list[CombinedTensor]]:
    by_source: dict[str, list[CombinedTensor]] = {}
    for combined in model.combined_tensors():
        for source in combined.sources:
            by_source.setdefault(source, []).append(combined)
    return by_source


def _transform_of(
    model: ArchModel, name: str, gguf_name: str, pair: LoraPair, probed: dict[tuple, str | None]
) -> str | None:
    """How the family's transform of this weight reaches the pair: "" (none), "rows" (B takes it),
    "columns" (A takes it), or None (neither: the module cannot be exported).

    Probed once per kind of tensor (layer numbers aside) on random rank-2 updates: with all the
    rows and a few columns (a row-wise transform does not depend on the column count), then with
    a few rows and all the columns.
    """
    if type(model).modify_tensor is ArchModel.modify_tensor:
        return ""
    rows, cols = pair.b.shape[0], pair.a.shape[1]
    key = (re.sub(r"\.\d+\.", ".#.", name), rows, cols)
    if key not in probed:
        if _follows(model, name, gguf_name, rows, min(cols, 16), "rows"):
            probed[key] = "rows"
        elif _follows(model, name, gguf_name, min(rows, 16), cols, "columns"):
            probed[key] = "columns"
        else:
            probed[key] = None
    return probed[key]


def _follows(model: ArchModel, name: str, gguf_name: str, rows: int, cols: int, side: str) -> bool:
    """Whether f(B @ A) == f(B) @ A (side "rows") or == B @ f(A) (side "columns") on a random pair."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((rows, 2)).astype(np.float32)
    a = rng.standard_normal((2, cols)).astype(np.float32)
    try:
        whole = model.modify_tensor(name, gguf_name, b @ a)
        if side == "rows":
            moved = model.modify_tensor(name, gguf_name, b)
            ok_shape, product = moved.shape == b.shape, moved @ a
        else:
            moved = model.modify_tensor(name, gguf_name, a)
            ok_shape, product = moved.shape == a.shape, b @ moved
    except ConversionError:  # the transform refuses a matrix of that shape
        return False
    return whole.shape == (rows, cols) and ok_shape and np.allclose(whole, product, rtol=1e-5, atol=1e-5)


def _factor(adapter: PeftAdapter, pair: LoraPair, alpha: float) -> float:
    """What lora_b is multiplied by so that llama.cpp's alpha / rank is this module's peft scale."""
    wanted = adapter.scale(pair)
    factor = wanted * pair.rank / alpha
    return 1.0 if math.isclose(factor, 1.0, rel_tol=1e-12) else factor


# -- the data ---------------------------------------------------------------------


def pair_data(model: ArchModel, adapter: PeftAdapter, p: PlannedPair) -> tuple[np.ndarray, np.ndarray]:
    """(lora_a, lora_b) as written, before the type conversion."""
    a = adapter.tensors.read(p.pair.a.name)
    b = adapter.tensors.read(p.pair.b.name)
    if a.dtype != b.dtype:  # as llama.cpp's converter: a mixed pair is computed in float32
        a, b = a.astype(np.float32), b.astype(np.float32)
    if p.rows is not None:
        b = p.rows._piece(b)
    if p.transform == "rows":
        b = model.modify_tensor(p.source, p.gguf_name, b)
    elif p.transform == "columns":
        a = model.modify_tensor(p.source, p.gguf_name, a)
    if p.factor != 1.0:
        b = b.astype(np.float32) * np.float32(p.factor)
    if p.pair.embedding:
        a = a.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _set_metadata(
    writer: gguf.GGUFWriter,
    adapter: PeftAdapter,
    model: ArchModel,
    alpha: float,
    file_type: gguf.LlamaFileType,
    type_label: str,
    base_spec: str,
) -> None:
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter.path.resolve().name)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, model.checkpoint.path.resolve().name if Path(base_spec).is_dir() else base_spec)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(provenance.KEY_SOURCE, adapter.path.resolve().name)
    writer.add_string(provenance.KEY_CONVERTER, provenance.converter_version())
    writer.add_string(provenance.KEY_QUANT_TYPE, type_label)
