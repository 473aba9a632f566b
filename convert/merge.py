"""Merge a LoRA adapter into its base model: `alpaca-convert merge`.

    merge(base, adapter, out) -> MergeResult

The result is a plain Hugging Face checkpoint (safetensors only) that the GGUF
exporter takes as is: the merged weights, every tokenizer file and the
generation config of the base, and the chat template the adapter was trained
with (the Alpaca one for Alpaca data), so that the exported GGUF carries it and
`alpaca-chat` picks it without being told.

Before anything is written, the merged model's logits on a probe prompt are
compared with those of base + adapter (unmerged); a difference beyond the
tolerance is an error, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alpaca_chat.errors import TrainingError, UsageError
from alpaca_chat.templates import ALPACA_JINJA, alpaca_prompt
from convert.atomic import atomic_directory
from convert.data import ALPACA
from convert.gguf_base import PROVENANCE_FILE
from convert.model_loading import base_shape, load_model, load_model_config, load_tokenizer, resolve_base
from convert.run_files import ADAPTER_FILES, read_training_meta

# Files that make up a tokenizer, copied from the base unchanged (the chat template aside).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)
TEMPLATE_FILE = "chat_template.jinja"
PROBE = (alpaca_prompt("Give three tips for staying healthy."), "1. Eat a balanced diet. 2. Exercise. 3. Sleep well.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOLERANCE = 1e-3  # relative to the largest logit; float32 merges agree to ~1e-6


class AdapterMismatchError(TrainingError):
    """The adapter was not trained on this base model (shapes, layers or modules differ)."""


class MergeCheckError(TrainingError):
    """The merged model does not reproduce base + adapter."""


@dataclass(frozen=True)
class MergeResult:
    out: Path
    max_logit_difference: float  # merged vs base + adapter, on the probe
    adapter_effect: float  # base + adapter vs base alone, on the probe
    dtype: str
    template: str  # "alpaca", or "base" when the base's own chat template was trained with
    seconds: float


def merge(
    base: str,
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    tolerance: float = DEFAULT_TOLERANCE,
) -> MergeResult:
    started = time.perf_counter()
    out, adapter = Path(out), Path(adapter)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    base_path = resolve_base(base)
    _check_adapter_files(adapter)
    meta = read_training_meta(adapter) or {}
    model_config = load_model_config(base_path)
    _check_base_matches(meta, model_config, adapter, base)
    save_dtype = _save_dtype(dtype, model_config)

    tokenizer = load_tokenizer(base_path)
    probe = _probe_ids(tokenizer)
    model = load_model(base_path, "cpu", dtype=torch.float32)
    base_logits = _logits(model, probe)
    peft_model = attach_adapter(model, adapter, base)
    expected = _logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    difference = verify_logits(_logits(merged, probe), expected, tolerance)

    template = meta.get("template", ALPACA)
    with atomic_directory(out) as tmp:
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        _drop_quantization_config(tmp / "config.json")
        copy_tokenizer(base_path, tmp)
        set_chat_template(tmp, ALPACA_JINJA if template == ALPACA else template)
    return MergeResult(
        out=out,
        max_logit_difference=difference,
        adapter_effect=(expected - base_logits).abs().max().item(),
        dtype=str(save_dtype).removeprefix("torch."),
        template="alpaca" if template == ALPACA else "base",
        seconds=time.perf_counter() - started,
    )


# -- checks ----------------------------------------------------------------------------


def _check_adapter_files(adapter: Path) -> None:
    if not adapter.is_dir():
        raise TrainingError(f"adapter directory not found: {adapter}")
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise TrainingError(f"{adapter} is not a LoRA adapter: no {', '.join(missing)} (did the fine-tune finish?)")


def _check_base_matches(meta: dict, model_config, adapter: Path, base: str) -> None:
    """Compare the base's shape with the one recorded at training time, when there is one."""
    trained_on = meta.get("base_model") or {}
    shape = base_shape(model_config)
    differences = [
        f"{name} {trained_on[name]} vs {value}"
        for name, value in shape.items()
        if trained_on.get(name) is not None and trained_on[name] != value
    ]
    if differences:
        raise AdapterMismatchError(
            f"the adapter {adapter} was trained on another model than {base}: {', '.join(differences)}"
        )


def attach_adapter(model, adapter: Path, base: str = "the base"):
    """Wrap `model` with the adapter's LoRA layers and weights; refuse anything that does not fit."""
    import peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        config = peft.PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(f"cannot read {adapter / 'adapter_config.json'}: {exc}") from None
    config.inference_mode = True
    config.base_model_name_or_path = getattr(model, "name_or_path", None)  # where it is now, not where it was
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that the base does not have
        raise AdapterMismatchError(f"the adapter {adapter} does not fit {base}: {_first_line(exc)}") from None
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:
        raise AdapterMismatchError(f"the adapter {adapter} does not fit {base}: {_size_mismatch(exc)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        extra = (result.unexpected_keys or missing)[0]
        raise AdapterMismatchError(
            f"the adapter {adapter} does not fit {base}: {len(result.unexpected_keys)} adapter tensors have no "
            f"place in it and {len(missing)} LoRA tensors are missing (e.g. {extra})"
        )
    return peft_model.eval()


def verify_logits(merged: torch.Tensor, expected: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The largest difference; MergeCheckError when above `tolerance` x the largest logit."""
    difference = (merged.float() - expected.float()).abs().max().item()
    limit = tolerance * max(1.0, expected.abs().max().item())
    if not difference <= limit:  # also catches NaN
        raise MergeCheckError(
            f"the merged model does not reproduce base + adapter: logits differ by up to {difference:.3g} "
            f"on the probe (tolerance {limit:.3g}); nothing was written"
        )
    return difference


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _size_mismatch(exc: RuntimeError) -> str:
    for line in str(exc).splitlines():
        if "size mismatch" in line:
            return line.strip().replace("base_model.model.", "")
    return _first_line(exc)


# -- the probe ---------------------------------------------------------------------------


def _probe_ids(tokenizer) -> torch.Tensor:
    prompt, response = PROBE
    ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[0].float()


# -- writing -------------------------------------------------------------------------------


def _save_dtype(choice: str, model_config) -> torch.dtype:
    if choice == "auto":
        saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        if isinstance(saved, torch.dtype):
            return saved
        return DTYPES.get(str(saved), torch.float32)
    if choice not in DTYPES:
        raise UsageError(f"--dtype: use auto, {', '.join(DTYPES)}, not {choice!r}")
    return DTYPES[choice]


def copy_tokenizer(base: Path, out: Path) -> None:
    """Every tokenizer file and the generation config, byte for byte."""
    # PROVENANCE_FILE: a base dequantized from a GGUF says so, through the merge into the exported GGUF.
    for name in (*TOKENIZER_FILES, "generation_config.json", PROVENANCE_FILE):
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)


def set_chat_template(checkpoint: Path, template: str) -> None:
    """Make `template` the checkpoint's one chat template (in chat_template.jinja, as transformers 5 saves it)."""
    config_file = checkpoint / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.pop("chat_template", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (checkpoint / "chat_template.json").unlink(missing_ok=True)
    (checkpoint / TEMPLATE_FILE).write_text(template, encoding="utf-8")


def _drop_quantization_config(config_file: Path) -> None:
    """Merged weights are plain floats, whatever the base was loaded from."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
