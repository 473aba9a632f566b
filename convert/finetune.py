"""LoRA fine-tuning with transformers' Trainer and peft: `alpaca-convert finetune`.

    finetune(FinetuneConfig(base=..., data=..., out=...)) -> FinetuneResult

What it writes in `out`:

    adapter_model.safetensors, adapter_config.json   the LoRA adapter (peft)
    training.json     settings, the chat template trained with, the base's shape
    metrics.json      train/eval loss per step, tokens/s, wall time
    loss.png          the loss curves
    heldout.jsonl     the validation rows (for `compare` and the pipeline)
    checkpoints/      Trainer checkpoints, for --resume

No compute goes to padding: each batch is packed into one row, positions
restart at every example and the attention mask keeps examples apart
(transformers derives it from the position ids). Logits, the largest activation
of a small model, are computed only where a token is trained on.

The CPU is the default; a CUDA GPU is used when present, with bf16 when it
supports it. Several GPUs or nodes: `accelerate launch -m convert.cli finetune ...`.
The first Ctrl+C saves a checkpoint at the end of the current step and stops;
a second one aborts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

from alpaca_chat.errors import DataError, TrainingError, UsageError
from convert import data as datamod
from convert.atomic import atomic_output
from convert.finetune_config import LORA_DEFAULTS, LORA_FALLBACK, FinetuneConfig, LoraSettings, lora_settings

__all__ = ["LORA_DEFAULTS", "LORA_FALLBACK", "FinetuneConfig", "LoraSettings", "finetune", "lora_settings"]

log = logging.getLogger(__name__)


# A packed row goes through the model in chunks of whole examples of at most
# this many tokens (or one longer example): attention then costs the sum of the
# chunks' squares, not the row's square, and examples never attend to each
# other. Measured on 2 CPU cores, 8 examples (1,200 tokens) a step, max length
# 256: 206 tok/s in 512-token chunks, 199 in 256, 187 in 1,024 and 167 as one
# row, and the smaller chunks hold less memory for the backward pass.
PACKED_ROW_TOKENS = 512

TRAINING_FILE = "training.json"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
HELDOUT_FILE = "heldout.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


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
    max_length = min(config.max_length, getattr(model_config, "max_position_embeddings", None) or config.max_length)
    prepared = prepare_data(config, tokenizer, max_length)
    if checkpoint is not None:
        _check_same_data(out, prepared)
    device = pick_device(config.device)
    lora = lora_settings(model_config.model_type, config)
    log.info("fine-tuning %s on %s: %s, LoRA %s, device %s", config.base, config.data, config, lora, device)
    _print(_describe_data(prepared, max_length))
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        meta = _training_meta(config, base_path, model_config, prepared, lora, max_length)
        _write_text(out / TRAINING_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _write_text(out / HELDOUT_FILE, datamod.to_jsonl(prepared.val_records))

    transformers.set_seed(config.seed)
    model = add_lora(load_model(base_path, device), lora)
    interrupt = _InterruptToCheckpoint()
    args = training_arguments(config, out, device, prepared, resuming=checkpoint is not None)
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
    if prepared.val and not interrupted and not _evaluated_at(trainer.state, trainer.state.global_step):
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


def build_trainer(
    model, args, prepared: PreparedData, *, chunk_tokens: int, callbacks=(), progress: bool = True
) -> PackedTrainer:
    trainer = PackedTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.val or None,
        data_collator=PackedCollator(),
        callbacks=list(callbacks),
        chunk_tokens=chunk_tokens,
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if progress:
        trainer.add_callback(ProgressReport())
    return trainer


def _write_outputs(out: Path, model, metrics: dict, *, adapter: bool) -> None:
    _write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    plot_losses(metrics, out / PLOT_FILE)
    if adapter:
        model.save_pretrained(out)


# -- loading ---------------------------------------------------------------------------


def resolve_base(spec: str) -> Path:
    """A local checkpoint directory, or a hub id fetched into the HF cache."""
    from convert.export.checkpoint import CheckpointError, resolve_checkpoint

    try:
        path, _ = resolve_checkpoint(spec)
    except CheckpointError as exc:
        raise TrainingError(f"base model: {exc}") from None
    if not (path / "config.json").is_file():
        raise TrainingError(f"base model: no config.json in {path}: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise TrainingError(
            f"base model: {path} has no .safetensors weights; only safetensors are loaded (pickles can run code)"
        )
    return path


def load_tokenizer(path: Path):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the tokenizer of {path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: Path):
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read the model config in {path}: {exc}") from None


def load_model(path: Path, device: str, dtype: torch.dtype | None = None):
    """The base model from safetensors only: float32 on the CPU, bf16 on a GPU that has it."""
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    config = load_model_config(path)
    quantization = getattr(config, "quantization_config", None)
    if _quant_method(quantization) == "gguf":
        # transformers marks weights it dequantized from a GGUF this way; on disk they are plain floats.
        del config.quantization_config
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the base model from {path}: {exc}") from None
    model.config.use_cache = False  # a cache only costs memory while training
    return model


def _quant_method(quantization) -> str | None:
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    method = getattr(quantization, "quant_method", None)
    return getattr(method, "value", method)


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


def pick_device(choice: str) -> str:
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: use auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


# -- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    train: list[datamod.Example]
    val: list[datamod.Example]
    val_records: list[datamod.Record]
    template: str  # "alpaca", or the chat template's Jinja text
    train_report: datamod.TokenizeReport
    val_report: datamod.TokenizeReport | None
    fingerprint: str  # sha256 of the rows, for --resume


def prepare_data(config: FinetuneConfig, tokenizer, max_length: int) -> PreparedData:
    records = datamod.load_records(config.data)
    if config.val_data:
        train_records, val_records = records, datamod.load_records(config.val_data)
    else:
        train_records, val_records = datamod.split(records, config.val_size, config.seed)
    common = dict(max_length=max_length, train_on_inputs=config.train_on_inputs, check_fit=False)
    train, train_report = datamod.tokenize(train_records, tokenizer, **common)
    val, val_report = [], None
    if val_records:
        val, val_report = datamod.tokenize(val_records, tokenizer, **common)
    datamod.check_some_fit([r for r in (train_report, val_report) if r], max_length, config.data)
    if not train:
        raise DataError(f"{config.data}: no training example is left after truncation to {max_length} tokens")
    digest = hashlib.sha256(datamod.to_jsonl(train_records + val_records).encode()).hexdigest()
    return PreparedData(
        train, val, val_records, datamod.template_source(train_records, tokenizer), train_report, val_report, digest
    )


def _describe_data(prepared: PreparedData, max_length: int) -> str:
    r = prepared.train_report
    text = f"data: {r.examples} training examples ({r.tokens} tokens, {r.trained_tokens} trained on)"
    if prepared.val_report:
        text += f", {prepared.val_report.examples} held out"
    cut = r.truncated + (prepared.val_report.truncated if prepared.val_report else 0)
    dropped = r.dropped + (prepared.val_report.dropped if prepared.val_report else 0)
    if cut or dropped:
        text += f"; {cut} truncated to {max_length} tokens, {dropped} dropped (prompt alone too long)"
    return text


# -- packing and the loss -----------------------------------------------------------------


class PackedCollator:
    """Concatenate a batch into one row: no padding at all.

    `position_ids` restart at 0 for every example, which is how transformers
    tells packed examples apart (each attends only to itself). `shift_labels`
    holds, at each position, the next token of the same example or
    IGNORE_INDEX: the targets, with nothing crossing an example's end.
    """

    def __call__(self, examples: Sequence[datamod.Example]) -> dict[str, torch.Tensor]:
        input_ids, labels, targets, positions = [], [], [], []
        for example in examples:
            input_ids.extend(example.input_ids)
            labels.extend(example.labels)
            targets.extend(example.labels[1:])
            targets.append(datamod.IGNORE_INDEX)
            positions.extend(range(len(example)))

        def row(values):
            return torch.tensor([values], dtype=torch.long)

        return {
            "input_ids": row(input_ids),
            "labels": row(labels),
            "shift_labels": row(targets),
            "position_ids": row(positions),
        }


def packed_loss(
    model,
    inputs: dict[str, torch.Tensor],
    num_items: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
):
    """Cross-entropy over the trained positions only; logits are computed only there.

    The packed row goes through the model in chunks of whole examples of at
    most `chunk_tokens` tokens (one chunk when None): attention costs the sum
    of the chunks' squares instead of the whole row's square, and a chunk with
    nothing to train on is skipped. Returns the summed loss divided by
    `num_items` (the trained tokens of the whole accumulated batch), or the
    mean when it is None, and the last chunk's model outputs.
    """
    targets = inputs["shift_labels"]
    total = torch.zeros((), device=targets.device)
    outputs = None
    for start, end in chunk_bounds(inputs["position_ids"], chunk_tokens):
        keep = targets[:, start:end].ne(datamod.IGNORE_INDEX)
        if not keep.any():
            continue
        outputs = model(
            input_ids=inputs["input_ids"][:, start:end],
            position_ids=inputs["position_ids"][:, start:end],
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
        total = total + torch.nn.functional.cross_entropy(logits, targets[:, start:end][keep], reduction="sum")
    divisor = num_items if num_items is not None else targets.ne(datamod.IGNORE_INDEX).sum().clamp(min=1)
    return total / divisor, outputs


def chunk_bounds(position_ids: torch.Tensor, chunk_tokens: int | None) -> list[tuple[int, int]]:
    """[start, end) spans of a packed row, cut between examples, each at most `chunk_tokens` long
    (or a single example, if that is longer)."""
    length = position_ids.shape[-1]
    if chunk_tokens is None or length <= chunk_tokens:
        return [(0, length)]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds, begin = [], 0
    for start, end in zip(starts, [*starts[1:], length]):  # each example's span
        if end - begin > chunk_tokens and start > begin:
            bounds.append((begin, start))
            begin = start
    bounds.append((begin, length))
    return bounds


class PackedTrainer(transformers.Trainer):
    """Trainer whose loss is `packed_loss`, normalized over the accumulated batch."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, chunk_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chunk_tokens = chunk_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = packed_loss(model, inputs, num_items_in_batch, self.chunk_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the divisor is global
        return (loss, outputs) if return_outputs else loss


def training_arguments(config: FinetuneConfig, out: Path, device: str, prepared: PreparedData, *, resuming: bool):
    steps = total_steps(config, len(prepared.train))
    has_eval = bool(prepared.val)
    optional = {"gradient_checkpointing": True} if config.gradient_checkpointing else {}
    return transformers.TrainingArguments(
        output_dir=str(out / CHECKPOINTS_DIR),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=round(config.warmup_ratio * steps),
        weight_decay=config.weight_decay,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps or math.ceil(steps / 5),
        eval_on_start=has_eval and not resuming,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        include_num_input_tokens_seen="all",  # packed rows have no padding: every token is real
        prediction_loss_only=True,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
        report_to="none",
        dataloader_pin_memory=device == "cuda",
        **optional,
    )


def total_steps(config: FinetuneConfig, n_train: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_epoch = max(1, math.ceil(n_train / config.batch_size) // config.grad_accum)
    return max(1, math.ceil(per_epoch * config.epochs))


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


class _InterruptToCheckpoint(TrainerCallback):
    """The first Ctrl+C (SIGINT) asks for a checkpoint at the end of the step, then a stop."""

    def __init__(self):
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.requested, args.device):
            control.should_save = True
            control.should_training_stop = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            _print("\nstopping after this step and saving a checkpoint (Ctrl+C again to abort)")

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _any_process(flag: bool, device) -> bool:
    """True when any process of a distributed run has the flag: all of them must stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# -- progress and metrics --------------------------------------------------------------------


class ProgressReport(TrainerCallback):
    """A bar with the loss, tokens/s and ETA on a terminal; a line every ~10% otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.started, self.first_step = time.perf_counter(), state.global_step
        self.tokens_at_start = state.num_input_tokens_seen
        self.every = max(1, state.max_steps // 10)
        if self.stream.isatty() and shutil.get_terminal_size((0, 0)).columns > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, unit="step", file=self.stream, dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None and state.is_world_process_zero:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs and "loss" in logs):
            return
        speed = f"loss {logs['loss']:.4f}, {self._tokens_per_second(state):.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(speed)
        elif state.global_step % self.every == 0 or state.global_step == state.max_steps:
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            line = f"step {state.global_step}/{state.max_steps}: {speed}, ETA {_duration(eta)}"
            print(line, file=self.stream, flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero and metrics and "eval_loss" in metrics:
            line = f"step {state.global_step}: eval loss {metrics['eval_loss']:.4f}"
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _tokens_per_second(self, state) -> float:
        elapsed = time.perf_counter() - self.started
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _evaluated_at(state, step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in state.log_history)


def collect_metrics(
    state, prepared: PreparedData, train_started: float, started: float, checkpoint: Path | None, interrupted: bool
) -> dict:
    """metrics.json: per-step losses from the Trainer's log, plus throughput and timings."""
    train = [
        {
            "step": e["step"],
            "loss": e["loss"],
            "learning_rate": e.get("learning_rate"),
            "tokens": e.get("num_input_tokens_seen"),
        }
        for e in state.log_history
        if "loss" in e
    ]
    evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in state.log_history if "eval_loss" in e]
    train_seconds = time.perf_counter() - train_started
    session_tokens = state.num_input_tokens_seen - _tokens_at(state, checkpoint)
    return {
        "status": "interrupted" if interrupted else "completed",
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": train,
        "eval_loss": evals,
        "base_eval_loss": evals[0]["loss"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_loss": evals[-1]["loss"] if evals else None,
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_second": session_tokens / train_seconds if train_seconds > 0 else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "resumed_from_step": _step_of(checkpoint),
        "data": {
            "train_examples": prepared.train_report.examples,
            "val_examples": prepared.val_report.examples if prepared.val_report else 0,
            "truncated": prepared.train_report.truncated + (prepared.val_report.truncated if prepared.val_report else 0),
            "dropped": prepared.train_report.dropped + (prepared.val_report.dropped if prepared.val_report else 0),
            "trained_tokens_per_epoch": prepared.train_report.trained_tokens,
        },
    }


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint is not None else None


def _tokens_at(state, checkpoint: Path | None) -> int:
    step = _step_of(checkpoint)
    if step is None:
        return 0
    seen = [
        e["num_input_tokens_seen"] for e in state.log_history if e.get("step") == step and "num_input_tokens_seen" in e
    ]
    return seen[-1] if seen else 0


def plot_losses(metrics: dict, png: Path) -> Path:
    """Train and eval loss against the step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    train, evals = metrics["train_loss"], metrics["eval_loss"]
    if train:
        axes.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss", linewidth=1)
    if evals:
        axes.plot([p["step"] for p in evals], [p["loss"] for p in evals], "o-", label="eval loss (held out)")
    if metrics.get("base_eval_loss") is not None:
        axes.axhline(metrics["base_eval_loss"], color="grey", linestyle="--", linewidth=1, label="base model (eval)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_output(png) as tmp:
        figure.savefig(tmp, format="png")
    return png


# -- small helpers --------------------------------------------------------------------------------


def _training_meta(config, base_path, model_config, prepared: PreparedData, lora: LoraSettings, max_length: int) -> dict:
    """training.json: what merge, compare and the pipeline need to know about the run."""
    return {
        "base": config.base,
        "base_path": str(base_path),
        "base_model": {
            name: getattr(model_config, name, None)
            for name in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        },
        "template": prepared.template,
        "max_length": max_length,
        "lora": {**asdict(lora), "target_modules": _as_json(lora.target_modules)},
        "data_sha256": prepared.fingerprint,
        "heldout": HELDOUT_FILE,
        "settings": config.run_settings(),
    }


def _as_json(target_modules: tuple[str, ...] | str) -> list[str] | str:
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def read_training_meta(adapter_dir: Path) -> dict | None:
    """training.json of an adapter made here, or None for one made elsewhere."""
    try:
        return json.loads((Path(adapter_dir) / TRAINING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
