"""Is the checkpoint a GGUF base became the model the file holds? Checked before it is used.

transformers' GGUF reader maps a fixed set of llama.cpp keys onto config.json and drops the rest:
Llama 3's rope scaling (the `rope_freqs` tensor), Mistral's linear rope scaling, Phi-3.5's long
rope, Gemma's soft-capping and sliding windows... The checkpoint then loads and trains, but it is
another model: a fine-tune of it is not a fine-tune of the file. So before a GGUF base is cached,
our exporter plans the checkpoint as it would export it, and what it would write must agree with
the file:
- every hyperparameter key (`ARCH.*`) both write has the same value (floats as float32);
- every key the file has that changes what llama.cpp computes (rope, attention, soft-capping,
  sliding windows, experts, SSM sizes) is one the exporter writes too;
- the same tensors, with the same shapes; a tensor the exporter computes from the config alone
  (Llama 3's `rope_freqs`) has the file's values.
A disagreement stops the command in one line naming the key. The tensors' values are the file's
own (dequantized), so they are not compared here; convert/gguf_read_back.py places them exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import TrainingError

# Keys whose absence from the export would make llama.cpp compute something else (its defaults).
_MEANINGFUL = ("rope.", "attention.", "attn_logit_softcapping", "final_logit_softcapping", "expert_", "ssm.",
               "shortconv.", "leading_dense_block_count", "embedding_scale", "residual_scale", "logit_scale",
               "full_attention_interval", "interleave_moe_layer_step", "nextn_predict_layers")
# Keys compared only when both write them: llama.cpp's converter writes some where they equal
# what llama.cpp derives anyway (the rope dimensions as the head size, the value length as the key's).
_OPTIONAL = ("vocab_size", "rope.scaling.original_context_length", "rope.dimension_count",
             "attention.value_length", "attention.value_length_swa")


def check_base(gguf_path: Path, checkpoint: Path) -> None:
    """Raise TrainingError (one line) if `checkpoint` would not export to the model in `gguf_path`."""
    from convert.export.checkpoint import open_checkpoint
    from convert.export.exporter import plan_tensors
    from convert.export.registry import model_class_for

    ckpt = open_checkpoint(checkpoint)
    model = model_class_for(ckpt.config)(ckpt)
    writer = gguf.GGUFWriter(None, model.arch_name)
    model.set_parameters(writer)
    ours = {key: value.value for key, value in writer.kv_data[0].items()}
    reader = gguf.GGUFReader(gguf_path)
    arch = str(reader.fields["general.architecture"].contents())
    if arch != model.arch_name:
        _refuse(gguf_path, f"it is a {arch} model, read back as {model.arch_name}")
    _compare_keys(gguf_path, arch, {f.name: f.contents() for f in reader.fields.values()}, ours)
    _compare_tensors(gguf_path, model, plan_tensors(model, gguf.GGMLQuantizationType.F32), reader)


def _compare_keys(gguf_path: Path, arch: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    prefix = arch + "."
    for key, value in theirs.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        if key not in ours:
            if short.startswith(_MEANINGFUL) and not short.startswith(_OPTIONAL):
                _refuse(gguf_path, f"its {key} ({_shown(value)}) would be lost")
            continue
        if not _same(value, ours[key]):
            _refuse(gguf_path, f"its {key} is {_shown(value)}, but it would be read as {_shown(ours[key])}")


def _compare_tensors(gguf_path: Path, model, plan, reader: gguf.GGUFReader) -> None:
    file_tensors = {t.name: t for t in reader.tensors}
    planned_names = {planned.name for planned in plan}
    unused = [name for name in file_tensors if name not in planned_names]
    if unused:
        _refuse(gguf_path, f"its {unused[0]} would be lost")
    for planned in plan:
        tensor = file_tensors.get(planned.name)
        if tensor is None:
            _refuse(gguf_path, f"it has no {planned.name}, which the model read back needs")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != tuple(planned.shape):
            _refuse(gguf_path, f"its {planned.name} is {shape}, read back as {tuple(planned.shape)}")
        if planned.data is not None and model.extra_tensor_source(planned.name, planned.data) is None:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(planned.data.shape)
            if not np.allclose(values, planned.data, rtol=1e-6, atol=0):
                _refuse(gguf_path, f"its {planned.name} differs from the one its settings read back give")


def _same(a: Any, b: Any) -> bool:
    """Equal values; a list of one repeated value equals that value (a per-layer key written whole)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        items, scalar = (a, b) if isinstance(a, (list, tuple)) else (b, a)
        return all(_same(x, scalar) for x in items)
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b)
    return a == b


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(gguf_path: Path, why: str) -> None:
    raise TrainingError(
        f"base model: {gguf_path.name} cannot be read back as the same model ({why}); "
        "give a Hugging Face checkpoint directory instead"
    )
