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
from convert.export.base import ArchModel
from convert.export.checkpoint import open_checkpoint
from convert.export.exporter import PlannedTensor, plan_tensors
from convert.export.registry import registered_classes

Q = gguf.GGMLQuantizationType


class GgufKeys:
    """A GGUF file's metadata and tensor shapes, read as `config_from_gguf` needs them."""

    def __init__(self, reader: gguf.GGUFReader):
        self.arch = str(reader.fields["general.architecture"].contents())
        self._fields = reader.fields
        # numpy order (rows first), as the exporter plans them
        self.shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        """`ARCH.key`'s value (floats as the shortest decimal that gives the stored float32)."""
        return self.raw(f"{self.arch}.{key}", default)

    def raw(self, full_key: str, default: Any = None) -> Any:
        field = self._fields.get(full_key)
        if field is None:
            return default
        return _readable(field.contents())

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise TrainingError(f"the GGUF has no {self.arch}.{key}: not a file llama.cpp's {self.arch} can run")
        return value

    def token_ids(self) -> dict[str, int]:
        """bos/eos/pad token ids for config.json, where the file names them."""
        ids = {}
        for config_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                     ("pad_token_id", "padding_token_id")):
            value = self.raw(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                ids[config_key] = int(value)
        return ids

    def vocab_size(self) -> int:
        return self.shapes["token_embd.weight"][0]

    def tied(self) -> bool:
        return "output.weight" not in self.shapes


def decoder_config(keys: GgufKeys) -> dict[str, Any]:
    """What every decoder-only family's config.json shares, as ArchModel.set_parameters wrote it."""
    heads = int(keys.need("attention.head_count"))
    config = {
        "hidden_size": keys.need("embedding_length"),
        "num_hidden_layers": keys.need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": keys.get("attention.head_count_kv") or heads,
        "rms_norm_eps": keys.need("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": keys.need("context_length"),
        "vocab_size": keys.vocab_size(),
        "tie_word_embeddings": keys.tied(),
        **keys.token_ids(),
    }
    if keys.has("feed_forward_length"):
        config["intermediate_size"] = keys.get("feed_forward_length")
    if keys.has("attention.key_length"):
        config["head_dim"] = keys.get("attention.key_length")
    return config


def rope_parameters(keys: GgufKeys) -> dict[str, Any]:
    """transformers 5's rope_parameters for the rope ArchModel._set_rope wrote."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": keys.get("rope.freq_base", 10000.0)}
    kind = keys.get("rope.scaling.type")
    if kind == "linear":
        rope.update(rope_type="linear", factor=keys.need("rope.scaling.factor"))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=keys.need("rope.scaling.factor"),
                    original_max_position_embeddings=keys.need("rope.scaling.original_context_length"))
        for name, key in (("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
                          ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if keys.has(f"rope.scaling.{key}"):
                rope[name] = keys.get(f"rope.scaling.{key}")
    elif kind not in (None, "none"):
        raise TrainingError(f"base model: rope scaling {kind!r} cannot be read back")
    return rope


def _readable(value: Any) -> Any:
    if isinstance(value, float):
        return float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return value


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
    kind = keys.raw("tokenizer.ggml.model")
    if kind != "gpt2":
        # A SentencePiece vocabulary as transformers' reader rebuilds it loses its scores and BOS
        # setting (checked on ERNIE 4.5): the fine-tune would see other tokens than the model.
        raise TrainingError(
            f"base model: {gguf_path.name}'s {kind!r} tokenizer cannot be read back exactly; "
            "give a Hugging Face checkpoint directory instead"
        )
    config = family.config_from_gguf(keys)
    _save_skeleton(config, staging)
    model = family(open_checkpoint(staging))
    weights = _weights_from_file(model, plan_tensors(model, Q.F32), {t.name: t for t in reader.tensors}, keys)
    _write_weights(staging, weights)
    _save_tokenizer(gguf_path, keys, family, staging)


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
        for name in self.model.checkpoint.tensors:
            if self.model.skip_tensor(name) and name not in self.counts:
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


def _save_tokenizer(gguf_path: Path, keys: GgufKeys, family: type[ArchModel], staging: Path) -> None:
    """The file's tokenizer as transformers' GGUF tokenizer reader builds it (by tokenizer kind,
    whatever the architecture), with its chat template, splitting text as the file's
    `tokenizer.ggml.pre` says (transformers' table lacks some names, e.g. glm4)."""
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.backend_tokenizer.pre_tokenizer = _pre_tokenizer(keys, family)
    tokenizer.save_pretrained(staging)


def _pre_tokenizer(keys: GgufKeys, family: type[ArchModel]):
    """The tokenizers pre-tokenizer our exporter would name as the file's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    from convert.export.pretokenizers import PRE_TOKENIZERS

    name = keys.raw("tokenizer.ggml.pre")
    ours = {alias: base for base, alias in family.pre_tokenizer_names.items()}.get(name, name)
    steps = next((steps for steps, known in PRE_TOKENIZERS.items() if known == ours), None)
    if steps is None:
        raise TrainingError(f"base model: the GGUF's pre-tokenizer {name!r} cannot be read back")
    built = {
        "regex": lambda step: pre_tokenizers.Split(Regex(step[1]), behavior="isolated"),
        "bytes": lambda step: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        "digits": lambda step: pre_tokenizers.Digits(individual_digits=True),
    }
    return pre_tokenizers.Sequence([built[step[0]](step) for step in steps])
