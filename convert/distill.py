"""`alpaca-convert distill`: train a student on a teacher's logits (knowledge distillation).

    distill(FinetuneConfig(base=STUDENT, data=..., out=OUT, ...), DistillSettings(teacher=T))

The loss at each trained position is the KL divergence from the teacher's next-token
distribution to the student's, both softened by a temperature T and scaled by T^2 (Hinton
et al.), optionally mixed with the plain cross-entropy on the data:
    loss = (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T) + alpha * CE.
The teacher's distribution is its top-k logits, renormalized (the cache keeps k per
position, convert/distill_teacher.py): the rest of the vocabulary carries almost no mass.

The fine-tune's machinery is reused as it is: its settings and flags (FinetuneConfig),
data loading and packing (a batch is one row, positions restart per example), the
Trainer with its checkpoints, Ctrl+C and --resume; only the loss differs. The student
trains fully or through LoRA (merged at the end); OUT is a checkpoint `export` takes.
Data: Alpaca rows (as finetune), a plain-text file (.txt, every token trained on), or
`teacher-samples` (the teacher answers the built-in seed instructions, sampled, and the
student learns those answers): offline with nothing but the two models.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from alpaca_chat.errors import TrainingError, UsageError
from convert import data as datamod
from convert.finetune_config import FinetuneConfig

TEACHER_SAMPLES = "teacher-samples"
CACHE_DIR = "teacher-cache"
DISTILL_FILE = "distill.json"


@dataclass(frozen=True)
class DistillSettings:
    """What distillation adds to the fine-tune's settings; the help text is the flag's."""

    teacher: str
    temperature: float = 2.0
    alpha: float = 0.0
    top_k: int = 32
    full: bool = False
    teacher_samples: int = 0
    teacher_ctx: int = 1024

    def check(self) -> None:
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be above 0, not {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"--alpha is the cross-entropy's share: between 0 and 1, not {self.alpha}")
        if self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, not {self.top_k}")


# -- the loss --------------------------------------------------------------------


def distill_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_ids: torch.Tensor,
                 targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """Summed over positions: (1 - alpha) * T^2 * KL(teacher || student) + alpha * CE(targets).

    student_logits [n, vocab]; teacher_values/teacher_ids [n, k]: the teacher's top-k logits and
    their token ids; targets [n]: the data's next tokens.
    """
    t = float(temperature)
    teacher_p = torch.softmax(teacher_values.float() / t, dim=-1)
    student_log_p = torch.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_ids.long())
    kl = (teacher_p * (torch.log(teacher_p.clamp_min(1e-30)) - student_log_p)).sum()
    loss = (1.0 - alpha) * t * t * kl
    if alpha:
        loss = loss + alpha * torch.nn.functional.cross_entropy(student_logits.float(), targets, reduction="sum")
    return loss


# -- batches: the fine-tune's packed rows, with the teacher's top-k at the trained positions ----


@dataclass(frozen=True)
class DistillExample(datamod.Example):
    key: int = -1  # its index in the teacher cache


class DistillCollator:
    def __init__(self, teacher_rows: list[tuple[np.ndarray, np.ndarray]]):
        from convert.packing import PackedCollator

        self.packed = PackedCollator()
        self.rows = teacher_rows

    def __call__(self, examples):
        batch = self.packed(examples)
        values = np.concatenate([self.rows[e.key][0] for e in examples])
        ids = np.concatenate([self.rows[e.key][1] for e in examples])
        batch["teacher_values"] = torch.from_numpy(values)
        batch["teacher_ids"] = torch.from_numpy(ids)
        return batch


def make_trainer_class():
    from convert.packing import forward_pieces
    from convert.trainer import PackedTrainer

    class DistillTrainer(PackedTrainer):
        """The fine-tune's Trainer with `distill_loss` over the packed row's trained positions.

        The row goes through the model as the fine-tune's does (`forward_pieces`: chunks of whole
        examples, or one example per padded row for layers that carry a state across tokens), in
        the row's order, so the trained positions line up with the teacher's top-k."""

        temperature = 2.0
        alpha = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            values, ids = inputs.pop("teacher_values"), inputs.pop("teacher_ids")
            config = getattr(getattr(model, "module", model), "config", None)
            total = torch.zeros((), device=inputs["shift_labels"].device)
            outputs, offset = None, 0
            for piece in forward_pieces(config, inputs, self.chunk_tokens, keep_order=True):
                targets = piece["shift_labels"]
                keep = targets.ne(datamod.IGNORE_INDEX)
                n = int(keep.sum())
                if not n:
                    continue
                outputs = model(input_ids=piece["input_ids"], position_ids=piece["position_ids"],
                                use_cache=False, logits_to_keep=keep)
                logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
                total = total + distill_loss(logits, values[offset:offset + n], ids[offset:offset + n],
                                             targets[keep], self.temperature, self.alpha)
                offset += n
            divisor = num_items_in_batch if num_items_in_batch is not None else max(offset, 1)
            loss = total / divisor
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


# -- data ------------------------------------------------------------------------


def prepare_examples(config: FinetuneConfig, tokenizer, max_length: int) -> tuple[list, list, str]:
    """(train, val, a description): Alpaca rows through the fine-tune's data code, or a plain text file."""
    path = Path(config.data)
    if path.suffix == ".txt" and path.is_file():
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        step = max_length - len(bos)
        chunks = [bos + ids[i:i + step] for i in range(0, len(ids), step) if len(ids[i:i + step]) >= 8]
        if not chunks:
            raise UsageError(f"--data {path}: no text to train on")
        examples = [datamod.Example(tuple(c), tuple(c)) for c in chunks]
        n_val = _val_count(config.val_size, len(examples))
        return examples[n_val:], examples[:n_val], f"data: {len(ids)} tokens of text in {len(chunks)} pieces"
    prepared = datamod.prepare_data(config, tokenizer, max_length)
    return prepared.train, prepared.val, prepared.describe(max_length)


def _val_count(val_size: float, n: int) -> int:
    count = int(val_size) if val_size >= 1 else int(round(val_size * n))
    return min(count, n - 1)


def teacher_samples(teacher, n: int, out_file: Path, *, max_tokens: int = 160, seed: int = 0) -> Path:
    """`n` Alpaca rows whose outputs the teacher wrote (sampled, temperature 0.8) for the seed instructions."""
    from alpaca_chat.templates import alpaca_prompt
    from convert.atomic import atomic_output

    if out_file.is_file() and len(out_file.read_text(encoding="utf-8").splitlines()) == n:
        return out_file  # written by an earlier (interrupted) run
    seeds = json.loads(datamod.BUILTIN_DATA["alpaca-seed"].read_text(encoding="utf-8"))
    rows = []
    for i in range(n):
        task = seeds[i % len(seeds)]
        prompt = alpaca_prompt(task["instruction"], task.get("input", ""))
        rows.append({"instruction": task["instruction"], "input": task.get("input", ""),
                     "output": teacher.sample(prompt, max_tokens=max_tokens, seed=seed + i).strip() or "."})
    with atomic_output(out_file) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out_file


# -- the command -------------------------------------------------------------------


def distill(config: FinetuneConfig, settings: DistillSettings, *, callbacks=(), progress: bool = True) -> dict:
    """Distill `settings.teacher` into `config.base`; writes OUT (a checkpoint) and returns the metrics."""
    import transformers

    from convert import distill_teacher as dt
    from convert import model_loading
    from convert.finetune import pick_device, pick_precision
    from convert.trainer import InterruptToCheckpoint, ProgressReport, training_arguments

    settings.check()
    started = time.perf_counter()
    out = Path(config.out)
    student_path = model_loading.resolve_base(config.base)
    tokenizer = model_loading.load_tokenizer(student_path)
    student_config = model_loading.load_model_config(student_path)
    teacher = dt.open_teacher(settings.teacher, n_ctx=max(settings.teacher_ctx, config.max_length))
    try:
        dt.check_same_vocabulary(teacher, tokenizer, int(student_config.get_text_config().vocab_size))
        out.mkdir(parents=True, exist_ok=True)
        if config.data == TEACHER_SAMPLES:
            if settings.teacher_samples < 1:
                raise UsageError("--data teacher-samples needs a number of samples: --data teacher-samples N")
            rows = teacher_samples(teacher, settings.teacher_samples,
                                   out / "teacher_samples.jsonl", seed=config.seed)
            config = replace(config, data=str(rows))
        train, val, description = prepare_examples(config, tokenizer, config.max_length)
        examples = [DistillExample(e.input_ids, e.labels, key=i) for i, e in enumerate([*train, *val])]
        train, val = examples[:len(train)], examples[len(train):]
        cache = dt.TeacherCache(out / CACHE_DIR, dt.cache_key(teacher.identity(), settings.top_k, examples))
        _print(description)
        ran = cache.fill(teacher, examples, settings.top_k,
                         progress=(lambda done, n: _print(f"teacher: {done}/{n} examples")) if progress else None)
        _print(f"teacher: {ran} examples run, {len(examples) - ran} from the cache {cache.dir}")
    finally:
        teacher.close()
    rows = cache.load(len(examples))

    checkpoint = _last_checkpoint(out) if config.resume else None
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    # LoRA: the frozen base in the compute type; full: fp32 weights (the Trainer autocasts).
    dtype = torch.float32 if settings.full else model_loading.FROZEN_DTYPES[precision]
    model = model_loading.load_model(student_path, device, dtype=dtype)
    if not settings.full:
        from convert.finetune import add_lora
        from convert.finetune_config import lora_settings

        model = add_lora(model, lora_settings(student_config.model_type, config))
    prepared = _Prepared(train, val)
    transformers.set_seed(config.seed)
    args = training_arguments(config, out, device, prepared, resuming=checkpoint is not None, precision=precision)
    trainer_class = make_trainer_class()
    interrupt = InterruptToCheckpoint()
    trainer = trainer_class(model=model, args=args, train_dataset=train, eval_dataset=val or None,
                            data_collator=DistillCollator(rows), callbacks=[interrupt, *callbacks],
                            chunk_tokens=max(config.max_length, 512))
    trainer.temperature, trainer.alpha = settings.temperature, settings.alpha
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if progress:
        trainer.add_callback(ProgressReport())
    with interrupt.installed():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    state = trainer.state
    if interrupt.requested and state.global_step < state.max_steps:
        from convert.finetune import TrainingInterrupted

        raise TrainingInterrupted(f"interrupted at step {state.global_step}/{state.max_steps}; run the same "
                                  "command with --resume to continue (the teacher's outputs are cached)")
    metrics = {
        "steps": state.global_step,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in state.log_history if "eval_loss" in h],
        "teacher_examples_run": ran,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": asdict(settings),
    }
    _save_student(model, settings, student_path, out, metrics)
    return metrics


@dataclass
class _Prepared:
    train: list
    val: list


def _last_checkpoint(out: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    from convert.trainer import CHECKPOINTS_DIR

    folder = out / CHECKPOINTS_DIR
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if found is None:
        raise UsageError(f"--resume: no checkpoint in {folder}")
    return Path(found)


def _save_student(model, settings: DistillSettings, student_path: Path, out: Path, metrics: dict) -> None:
    """The student's weights (LoRA merged), tokenizer and distill.json into OUT, each file renamed into place."""
    import os
    import tempfile

    from convert.merge import copy_tokenizer

    if not settings.full:
        model = model.merge_and_unload()
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".student.", suffix=".partial"))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer(student_path, stage)
        (stage / DISTILL_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        for file in sorted(stage.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.replace(file, out / file.name)
    except OSError as exc:
        raise TrainingError(f"cannot write the student into {out}: {exc}") from None
    finally:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)


def _print(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)
