"""The Trainer around the packed loss: its arguments, Ctrl+C, progress and metrics.

    build_trainer(model, args, prepared, chunk_tokens=...) -> PackedTrainer
    training_arguments(config, out, device, prepared, resuming=...) -> TrainingArguments
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import TrainerCallback

from convert.atomic import atomic_output
from convert.finetune_config import FinetuneConfig
from convert.packing import PackedCollator, packed_loss
from convert.run_files import CHECKPOINTS_DIR

if TYPE_CHECKING:
    from convert.data import PreparedData


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


def training_arguments(
    config: FinetuneConfig, out: Path, device: str, prepared: PreparedData, *, resuming: bool, precision: str = "fp32"
):
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
        bf16=precision == "bf16",  # autocast: the weights and optimizer state stay fp32
        fp16=precision == "fp16",
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


# -- Ctrl+C --------------------------------------------------------------------------------------


class InterruptToCheckpoint(TrainerCallback):
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


def evaluated_at(state, step: int) -> bool:
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


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
