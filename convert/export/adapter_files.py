"""A peft LoRA adapter directory read without torch: its settings, and its tensors paired per module.

    read_adapter(dir) -> PeftAdapter (settings checked, tensors indexed from the safetensors header)

Only what llama.cpp can apply at run time passes: plain LoRA pairs (`lora_A`/`lora_B`, or
`lora_embedding_A`/`_B` on an embedding). DoRA, LoRA biases, modules saved whole
(`modules_to_save`), trainable tokens, layer replication and other peft types are
refused here, in one line that says why and what to do instead (merge).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_chat.errors import ConversionError
from convert.export.checkpoint import Checkpoint, CheckpointError, TensorEntry, index_safetensors, read_json_object

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SAVED_BASE = ".base_layer.weight"
_MERGE_INSTEAD = "merge the adapter into the base instead (alpaca-convert merge)"
# adapter_config.json settings llama.cpp's LoRA has no counterpart for: key -> what it is.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "a DoRA adapter (its magnitude vectors rescale each merged weight)",
    "lora_bias": "an adapter with LoRA biases",
    "layer_replication": "an adapter with layer replication",
    "trainable_token_indices": "an adapter with trainable tokens",
    "alora_invocation_tokens": "an activated LoRA (aLoRA)",
    "fan_in_fan_out": "an adapter of transposed (Conv1D) layers",
}
# Adapter tensor suffix -> (which half of the pair, is it an embedding's).
_PAIR_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}


class AdapterError(ConversionError):
    """The adapter cannot become a llama.cpp LoRA adapter (kind, files, or a mismatch with the base)."""


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: `module` is its name in the base model (e.g. model.layers.0.self_attn.q_proj)."""

    module: str
    a: TensorEntry  # [r, in] (an embedding's: [r, vocab])
    b: TensorEntry  # [out, r] (an embedding's: [hidden, r])
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def base_tensor(self) -> str:
        return self.module + ".weight"


@dataclass(frozen=True)
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    tensors: Checkpoint  # the adapter's safetensors, read like a checkpoint's
    pairs: list[LoraPair]
    # Base weights peft saved beside the pairs (an adapted embedding or head: `base_layer`), by base
    # tensor name. Unchanged by training; the writer only checks their shapes against the base.
    saved_base: dict[str, TensorEntry]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    def scale(self, pair: LoraPair) -> float:
        """peft's scale of one module's update: alpha / r (alpha / sqrt(r) with rsLoRA), per-module
        alpha from alpha_pattern; the rank is the tensors' own (rank_pattern made them so)."""
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, pair.module, self.alpha))
        return alpha / (math.sqrt(pair.rank) if self.rslora else pair.rank)


def read_adapter(path: str | Path) -> PeftAdapter:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"adapter directory not found: {path}")
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        if pickled.is_file():
            raise AdapterError(
                f"{path} has only a pickled adapter (adapter_model.bin), which can run code when loaded; "
                "save it as safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"no {WEIGHTS_FILE} in {path}: not a peft adapter directory")
    entries = index_safetensors([weights])
    tensors = Checkpoint(path, config, entries, str(path))
    saved_base = {
        _base_name(name[: -len(_SAVED_BASE)]) + ".weight": entry
        for name, entry in entries.items()
        if name.endswith(_SAVED_BASE)
    }
    pairs = _pair({n: e for n, e in entries.items() if not n.endswith(_SAVED_BASE)}, weights.name)
    return PeftAdapter(path, config, tensors, pairs, saved_base)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    config = read_json_object(file, f"no {CONFIG_FILE} in {path}: not a peft adapter directory")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"{file} describes a {kind} adapter; llama.cpp applies only LoRA adapters")
    for key, what in _UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise AdapterError(f"{path.name} is {what}, which llama.cpp cannot apply at run time; {_MERGE_INSTEAD}")
    targets = config.get("target_parameters")
    if targets:  # peft puts LoRA on 3-D parameters, e.g. a mixture's fused experts
        shown = targets if isinstance(targets, str) else ", ".join(map(str, targets))
        raise AdapterError(
            f"{path.name} adapts parameters ({shown}) such as a mixture's "
            "fused mlp.experts, not 2-D weights: llama.cpp's adapters apply to 2-D weights only; train with "
            f"attention (and dense MLP) targets, or {_MERGE_INSTEAD}"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise AdapterError(f"{file}: {key} must be a positive number, not {value!r}")
    for key in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in pattern.values()
        ):
            raise AdapterError(f"{file}: {key} must map module names to positive numbers")
    return config


def _pair(entries: dict[str, TensorEntry], file_name: str) -> list[LoraPair]:
    halves: dict[str, dict[str, TensorEntry]] = {}
    kinds: dict[str, bool] = {}
    for name, entry in entries.items():
        module, half, embedding = _split_name(name, file_name)
        if module in halves and half in halves[module]:
            raise AdapterError(f"{file_name}: module {module} has two lora_{half.upper()} tensors")
        if kinds.setdefault(module, embedding) != embedding:
            raise AdapterError(f"{file_name}: module {module} mixes a linear and an embedding LoRA")
        halves.setdefault(module, {})[half] = entry
    pairs = []
    for module, found in sorted(halves.items()):
        if set(found) != {"a", "b"}:
            missing = "lora_A" if "a" not in found else "lora_B"
            raise AdapterError(f"{file_name}: module {module} has no {missing} tensor")
        pairs.append(_checked_pair(LoraPair(module, found["a"], found["b"], kinds[module]), file_name))
    if not pairs:
        raise AdapterError(f"{file_name} holds no LoRA tensors")
    return pairs


def _split_name(name: str, file_name: str) -> tuple[str, str, bool]:
    """(module, "a" or "b", is an embedding's) of an adapter tensor; anything else is refused."""
    for suffix, (half, embedding) in _PAIR_SUFFIXES.items():
        if name.endswith(suffix):
            return _base_name(name[: -len(suffix)]), half, embedding
    if "lora_magnitude_vector" in name:
        what = "a DoRA magnitude vector"
    elif name.endswith(".lora_B.bias"):
        what = "a LoRA bias"
    elif "trainable_tokens" in name:
        what = "trainable token rows"
    else:
        what = "a whole weight (modules_to_save), not a LoRA pair"
    raise AdapterError(
        f"{file_name}: tensor {name} is {what}, which a llama.cpp LoRA adapter cannot hold; {_MERGE_INSTEAD}"
    )


def _base_name(module: str) -> str:
    return module[len(_PREFIX):] if module.startswith(_PREFIX) else module


def _checked_pair(pair: LoraPair, file_name: str) -> LoraPair:
    a, b = pair.a.shape, pair.b.shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
        raise AdapterError(
            f"{file_name}: module {pair.module}'s lora_A {list(a)} and lora_B {list(b)} are not a LoRA pair "
            "(lora_A [r, in], lora_B [out, r])"
        )
    for entry in (pair.a, pair.b):
        if entry.dtype not in ("F64", "F32", "F16", "BF16"):
            raise AdapterError(f"{file_name}: tensor {entry.name} has dtype {entry.dtype}, not a float")
    return pair


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's lookup of a per-module setting (get_pattern_key): the first key, a regular expression,
    that matches the module's name or its end on a dot boundary."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise AdapterError(f"{CONFIG_FILE}: pattern {key!r} is not a regular expression") from None
    return default
