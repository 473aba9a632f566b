"""LoRA fine-tuning with transformers' Trainer and peft: `alpaca-convert finetune`.

    finetune(FinetuneConfig(base=..., data=..., out=...)) -> FinetuneResult

What it writes in `out`: the adapter, training.json, metrics.json, loss.png,
heldout.jsonl and checkpoints/ (convert/run_files.py names them).

No compute goes to padding: each batch is packed into one row, positions
restart at every example and the attention mask keeps examples apart
(transformers derives it from the position ids). A hybrid whose layers carry a
convolution or recurrent state (LFM2, Granite 4, Qwen3.5, Qwen3-Next) gets one
example per row, right-padded, so that no state crosses from one to the next. Logits, the largest activation
of a small model, are computed only where a token is trained on. That is
convert/packing.py; the Trainer around it, Ctrl+C and the metrics are
convert/trainer.py; the base is loaded by convert/model_loading.py; this module
prepares and runs.

The CPU is the default; a CUDA GPU is used when present. `--precision auto`
computes in bf16 where the GPU or the CPU (AVX512-BF16, AMX) has it
(convert/precision.py). Several GPUs or nodes: `accelerate launch -m convert.cli finetune ...`.
The first Ctrl+C saves a checkpoint at the end of the current step and stops;
a second one aborts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from alpaca_chat.errors import TrainingError, UsageError
from convert import data as datamod
from convert.allocator import keep_freed_memory
from convert.atomic import atomic_output
from convert.data import PreparedData, prepare_data
from convert.finetune_config import LORA_DEFAULTS, LORA_FALLBACK, FinetuneConfig, LoraSettings, lora_settings
from convert.gguf_base import read_provenance
from convert.model_loading import FROZEN_DTYPES, base_shape, load_model, load_model_config, load_tokenizer, resolve_base
from convert.packing import PACKED_ROW_TOKENS, PackedCollator, carried_state, chunk_bounds, packed_loss
from convert.run_files import CHECKPOINTS_DIR, HELDOUT_FILE, METRICS_FILE, PLOT_FILE, TRAINING_FILE
from convert.trainer import (
    InterruptToCheckpoint,
    PackedTrainer,
    ProgressReport,
    build_trainer,
    collect_metrics,
    evaluated_at,
    plot_losses,
    total_steps,
    training_arguments,
)

# Names of convert/packing.py and convert/trainer.py stay importable from here.
__all__ = [
    "CHECKPOINTS_DIR", "LORA_DEFAULTS", "LORA_FALLBACK", "PACKED_ROW_TOKENS", "FinetuneConfig", "LoraSettings",
    "PackedCollator", "PackedTrainer", "ProgressReport", "add_lora", "build_trainer", "chunk_bounds",
    "collect_metrics", "finetune", "lora_settings", "packed_loss", "pick_device", "pick_precision", "plot_losses",
    "total_steps", "training_arguments",
]

log = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """Ctrl+C: a checkpoint was saved and the run can be resumed."""

    exit_code = 130


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    metrics: dict

    @property
    def base_eval_loss(self) -> float | None:
        return self.metrics.get("base_eval_loss")

    @property
    def final_eval_loss(self) -> float | None:
        return self.metrics.get("final_eval_loss")


# -- the entry point ---------------------------------------------------------------


def finetune(
    config: FinetuneConfig, *, callbacks: Sequence[TrainerCallback] = (), progress: bool = True
) -> FinetuneResult:
    """Train a LoRA adapter; see the module docstring for what is written."""
    started = time.perf_counter()
    out = Path(config.out)
    checkpoint = _checkpoint_to_resume(out, config)
    base_path = resolve_base(config.base)
    tokenizer = load_tokenizer(base_path)
    model_config = load_model_config(base_path)
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    max_length = min(config.max_length, context or config.max_length)
    prepared = prepare_data(config, tokenizer, max_length)
    if checkpoint is not None:
        _check_same_data(out, prepared)
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    lora = without_bypassed_targets(lora_settings(model_config.model_type, config), model_config.model_type,
                                    device, chosen=config.target_modules is not None)
    log.info("fine-tuning %s on %s: %s, LoRA %s, device %s", config.base, config.data, config, lora, device)
    _print(f"settings: device {device}, precision {precision} (LoRA weights and optimizer fp32), "
           f"LoRA r={lora.r} alpha={lora.alpha} on {_as_json(lora.target_modules)}")
    _print(prepared.describe(max_length))
    not_packed = carried_state(model_config)
    if not_packed:
        _print(f"packing: off, one example per row, right-padded ({not_packed}, and a packed row "
               f"would leak it from one example into the next)")
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        meta = _training_meta(config, base_path, model_config, prepared, lora, max_length) | {"precision": precision}
        _write_text(out / TRAINING_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _write_text(out / HELDOUT_FILE, datamod.to_jsonl(prepared.val_records))

    if device == "cpu":
        keep_freed_memory()
    transformers.set_seed(config.seed)
    model = add_lora(load_model(base_path, device, dtype=FROZEN_DTYPES[precision]), lora)
    interrupt = InterruptToCheckpoint()
    args = training_arguments(config, out, device, prepared, resuming=checkpoint is not None, precision=precision)
    chunk_tokens = max(max_length, PACKED_ROW_TOKENS)
    trainer = build_trainer(
        model, args, prepared, chunk_tokens=chunk_tokens, callbacks=[interrupt, *callbacks], progress=progress
    )
    if checkpoint is not None:
        _print(f"resuming from {checkpoint}")
    train_started = time.perf_counter()
    with interrupt.installed():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    interrupted = interrupt.requested and trainer.state.global_step < trainer.state.max_steps
    if prepared.val and not interrupted and not evaluated_at(trainer.state, trainer.state.global_step):
        trainer.evaluate()
    metrics = collect_metrics(trainer.state, prepared, train_started, started, checkpoint, interrupted)
    if trainer.is_world_process_zero():
        _write_outputs(out, model, metrics, adapter=not interrupted)
    if interrupted:
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}/{trainer.state.max_steps}; a checkpoint is in "
            f"{out / CHECKPOINTS_DIR}; run the same command with --resume to continue"
        )
    return FinetuneResult(out, metrics)


def _write_outputs(out: Path, model, metrics: dict, *, adapter: bool) -> None:
    _write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    plot_losses(metrics, out / PLOT_FILE)
    if adapter:
        model.save_pretrained(out)


# -- the model -------------------------------------------------------------------------


def add_lora(model, lora: LoraSettings):
    import peft

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) if isinstance(lora.target_modules, tuple) else lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise TrainingError(f"cannot add LoRA to this model: {exc}") from None


# transformers' Mamba-2 layers train through mamba_ssm's fused kernel on a CUDA GPU where it is
# installed, and that kernel multiplies by `out_proj.weight` itself: a LoRA on out_proj would get no
# gradient and change nothing. (On the CPU, and without mamba_ssm, out_proj is called as a module.)
_FUSED_MAMBA_OUT_PROJ = ("granitemoehybrid", "bamba", "falcon_h1", "nemotron_h", "zamba2", "mamba2")


def without_bypassed_targets(lora: LoraSettings, model_type: str, device: str, *, chosen: bool) -> LoraSettings:
    """The LoRA settings less the modules a fused GPU kernel would run without their adapter."""
    import importlib.util

    targets = lora.target_modules
    if device != "cuda" or model_type not in _FUSED_MAMBA_OUT_PROJ or not isinstance(targets, tuple):
        return lora
    if "out_proj" not in targets or importlib.util.find_spec("mamba_ssm") is None:
        return lora
    reason = "mamba_ssm's fused Mamba-2 training kernel applies out_proj's weight directly, so its LoRA would not train"
    if chosen:
        raise UsageError(f"--target-modules out_proj: {reason}; leave it out, or train on the CPU (--device cpu)")
    _print(f"LoRA: out_proj left out on this GPU ({reason})")
    return replace(lora, target_modules=tuple(t for t in targets if t != "out_proj"))


def pick_precision(choice: str, device: str) -> str:
    from convert.precision import resolve_precision

    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_precision(choice, device, cuda_bf16=cuda_bf16)


def pick_device(choice: str) -> str:
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: use auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


# -- resume and Ctrl+C --------------------------------------------------------------------------


def _checkpoint_to_resume(out: Path, config: FinetuneConfig) -> Path | None:
    """The checkpoint --resume continues from; refuse to mix a new run with an old one."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / CHECKPOINTS_DIR
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if not config.resume:
        if last is not None:
            raise UsageError(
                f"{out} already holds checkpoints of a run: pass --resume to continue it, or choose another --out"
            )
        return None
    if last is None:
        raise UsageError(f"--resume: no checkpoint in {folder} to resume from")
    _check_same_run(out, config)
    return Path(last)


def _check_same_run(out: Path, config: FinetuneConfig) -> None:
    try:
        saved = json.loads((out / TRAINING_FILE).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--resume: {out / TRAINING_FILE} is missing or unreadable; cannot check the run") from None
    changed = [
        f"{name} {saved.get(name)!r} -> {value!r}"
        for name, value in config.run_settings().items()
        if saved.get(name) != value
    ]
    if changed:
        raise UsageError(f"--resume: the settings differ from the interrupted run: {'; '.join(changed)}")


def _check_same_data(out: Path, prepared: PreparedData) -> None:
    saved = json.loads((out / TRAINING_FILE).read_text(encoding="utf-8")).get("data_sha256")
    if saved != prepared.fingerprint:
        raise UsageError("--resume: the data changed since the interrupted run; start a new run instead")


# -- small helpers --------------------------------------------------------------------------------


def _training_meta(config, base_path, model_config, prepared: PreparedData, lora: LoraSettings, max_length: int) -> dict:
    """training.json: what merge, compare and the pipeline need to know about the run."""
    return {
        "base": config.base,
        "base_path": str(base_path),
        "base_gguf": read_provenance(base_path),  # None unless the base was dequantized from a GGUF
        "base_model": base_shape(model_config),
        "template": prepared.template,
        "max_length": max_length,
        "lora": {**asdict(lora), "target_modules": _as_json(lora.target_modules)},
        "data_sha256": prepared.fingerprint,
        "heldout": HELDOUT_FILE,
        "settings": config.run_settings(),
    }


def _as_json(target_modules: tuple[str, ...] | str) -> list[str] | str:
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
