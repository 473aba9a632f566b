"""A GGUF read back into a Hugging Face checkpoint by running our exporter backwards.

transformers' GGUF reader knows a fixed list of llama.cpp architectures. For a family it does
not read (OLMo 2/3, GLM-4.5, ERNIE 4.5, Granite 4, ...), `--base FILE.gguf` comes here:

1. the family's `config_from_gguf` turns the file's keys into config.json;
2. transformers builds that model's skeleton (no values) and saves it: the checkpoint layout,
   names and shapes, that the file's tensors must fill;
3. our exporter plans that checkpoint as it would export it, and each planned GGUF tensor's
   values go back where they came from. Where the exporter only moves values (reshape, permute,
   split, stack), the move is found by planning index arrays instead of weights, and inverted
   exactly. A family that computes values (A = -exp(A_log)) gives the inverse in
   `unmodify_tensor`. A tensor the exporter computes from the config (rope factors) must equal
   the file's: a check that the config was read right.

Every checkpoint value must be filled exactly once and every tensor of the file used; anything
else is refused in one line. The exporter stays the one description of each family's layout:
exporting the result gives the file back (tested per family).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import TrainingError
from convert import gguf_read_back_tokenizer
from convert.export.base import ArchModel
from convert.export.checkpoint import open_checkpoint
from convert.export.exporter import PlannedTensor, plan_tensors
from convert.export.gguf_keys import GgufKeys
from convert.export.registry import registered_classes

Q = gguf.GGMLQuantizationType


def family_for(keys: GgufKeys) -> type[ArchModel] | None:
    """The exporter family that reads this architecture back, or None."""
    for cls in registered_classes():
        if cls.reads_gguf(keys):
            return cls
    return None


def can_read_back(gguf_path: Path) -> bool:
    return family_for(GgufKeys(gguf.GGUFReader(gguf_path))) is not None


def read_back(gguf_path: Path, staging: Path) -> None:
    """Write the checkpoint (config, weights, tokenizer) the GGUF at `gguf_path` was exported from into `staging`."""
    reader = gguf.GGUFReader(gguf_path)
    keys = GgufKeys(reader)
    family = family_for(keys)
    if family is None:
        raise TrainingError(f"base model: {gguf_path.name}: llama.cpp architecture {keys.arch} cannot be read back")
    gguf_read_back_tokenizer.check_readable(keys, gguf_path.name)
    try:
        _save_skeleton(family.config_from_gguf(keys), staging)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as exc:
        # a key of the wrong type or a size transformers' config refuses: the file is not a model of its family
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"base model: {gguf_path.name}'s settings cannot be read back ({detail})") from None
    model = family(open_checkpoint(staging))
    weights = _weights_from_file(model, plan_tensors(model, Q.F32), {t.name: t for t in reader.tensors}, keys)
    _write_weights(staging, weights)
    gguf_read_back_tokenizer.save_tokenizer(gguf_path, keys, family, staging)


def _save_skeleton(config: dict[str, Any], staging: Path) -> None:
    """The model transformers builds from `config`, saved with uninitialized values: its layout."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.save_pretrained(staging, safe_serialization=True)


class _Filling:
    """Each checkpoint tensor's values, filled from the file's tensors, each value exactly once."""

    def __init__(self, model: ArchModel):
        self.model = model
        self.values: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.offsets: dict[str, int] = {}
        total = 0
        for name, entry in model.checkpoint.tensors.items():
            self.offsets[name] = total
            total += entry.n_elements

    def indices(self, source: str) -> np.ndarray:
        """Global positions of a checkpoint tensor's values, in its stored shape."""
        entry = self.model.checkpoint.tensors[source]
        return np.arange(self.offsets[source], self.offsets[source] + entry.n_elements, dtype=np.int64).reshape(
            entry.shape
        )

    def put(self, sources: tuple[str, ...], positions: np.ndarray, data: np.ndarray) -> None:
        positions, data = positions.ravel(), data.ravel()
        for source in sources:
            start = self.offsets[source]
            n = self.model.checkpoint.tensors[source].n_elements
            mine = (positions >= start) & (positions < start + n)
            local = positions[mine] - start
            values = self.values.setdefault(source, np.zeros(n, dtype=np.float32))
            counts = self.counts.setdefault(source, np.zeros(n, dtype=np.uint8))
            values[local] = data[mine]
            np.add.at(counts, local, 1)

    def put_whole(self, source: str, data: np.ndarray) -> None:
        entry = self.model.checkpoint.tensors[source]
        if tuple(data.shape) != tuple(entry.shape):
            raise TrainingError(f"base model: {source} read back as {data.shape}, expected {entry.shape}")
        self.put((source,), self.indices(source), data.astype(np.float32))

    def result(self) -> dict[str, np.ndarray]:
        for name, entry in self.model.checkpoint.tensors.items():
            if self.model.skip_tensor(name) and name not in self.counts:
                # unused by the model (e.g. a KV-shared layer's own k/v): zeros, so the checkpoint is whole
                self.values[name] = np.zeros(entry.n_elements, dtype=np.float32)
                continue
            counts = self.counts.get(name)
            if counts is None or not np.all(counts == 1):
                raise TrainingError(f"base model: the GGUF does not give every value of {name} exactly once")
        return {name: values.reshape(self.model.checkpoint.tensors[name].shape) for name, values in self.values.items()}


def _weights_from_file(
    model: ArchModel, plan: list[PlannedTensor], file_tensors: dict, keys: GgufKeys
) -> dict[str, np.ndarray]:
    filling = _Filling(model)
    for planned in plan:
        tensor = file_tensors.get(planned.name)
        if tensor is None:
            raise TrainingError(f"base model: the GGUF has no {planned.name}, which its settings call for")
        data = _dequantized(tensor)
        if tuple(data.shape) != tuple(planned.shape):
            raise TrainingError(
                f"base model: {planned.name} is {data.shape} in the GGUF; its settings imply {planned.shape}"
            )
        _fill_one(model, planned, data, filling)
    planned_names = {planned.name for planned in plan}
    unused = sorted(name for name in file_tensors
                    if name not in planned_names and not type(model).left_out_of_checkpoint(keys, name))
    if unused:
        raise TrainingError(f"base model: the GGUF's {unused[0]} has no place in a {model.checkpoint.architecture}")
    return filling.result()


def _fill_one(model: ArchModel, planned: PlannedTensor, data: np.ndarray, filling: _Filling) -> None:
    if planned.data is not None:
        source = model.extra_tensor_source(planned.name, data)
        if source is not None:  # computed from a checkpoint tensor
            filling.put_whole(*source)
            return
        # computed from the config: the file must agree
        if not np.allclose(planned.data, data, rtol=1e-6, atol=0):
            raise TrainingError(f"base model: the GGUF's {planned.name} does not follow from its settings")
        return
    if planned.combined is not None:
        combined = planned.combined
        positions = combined.assemble(filling.indices, np.dtype(np.int64))
        filling.put(combined.sources, positions, data)
        return
    source = planned.source
    assert source is not None
    if model.moves_values_only(source, planned.name):
        positions = model.modify_tensor(source, planned.name, filling.indices(source))
        filling.put((source,), positions, data)
    else:
        filling.put_whole(source, model.unmodify_tensor(source, planned.name, data))


def _dequantized(tensor) -> np.ndarray:
    """A file tensor as float32 in numpy order, dequantized by gguf's reference code."""
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(
        tuple(int(d) for d in reversed(tensor.shape))
    )


def _write_weights(staging: Path, weights: dict[str, np.ndarray]) -> None:
    """Replace the skeleton's weight files with the values read back."""
    from safetensors.numpy import save_file

    for old in [*staging.glob("*.safetensors"), *staging.glob("*.safetensors.index.json")]:
        old.unlink()
    save_file({name: np.ascontiguousarray(v) for name, v in weights.items()}, str(staging / "model.safetensors"),
              metadata={"format": "pt"})
