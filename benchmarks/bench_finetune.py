"""alpaca-convert's LoRA training loop vs a plain padded Trainer loop, in one run.

    python benchmarks/bench_finetune.py [--base DIR] [--data FILE] [--steps 8] [--batch-size 8]

The same LoRA on the same model, data, seed and batches, trained three ways:
  - ours: every batch packed into one row (no padding), logits only where a
    token is trained on (`alpaca-convert finetune`'s PackedTrainer), with
    `--precision auto` (bf16 where the CPU has AVX512-BF16 or AMX);
  - ours-fp32: the same in fp32, so the gain from bf16 shows on its own;
  - plain: transformers' Trainer with DataCollatorForSeq2Seq padding each
    batch to its longest example, the loss from the model, fp32 (the usual recipe).

Throughput: each side trains in its own process (ours sets up the process as
`alpaca-convert finetune` does: glibc keeps freed memory; plain keeps the
default allocator), and the three step in lockstep on the same batches, one
side at a time in alternating order, so that whatever else runs on the machine
slows all alike; the first step of each is not timed. Prints non-padding
tokens/s, ours / plain (target >= 2.5). Peak RSS (target ours <= 0.6x plain): each side then trains on its
own in a child process (Trainer.train, a few steps) and reports its high-water
mark, with its final loss as a check that both learn the same thing.

Without --base, a SmolLM2-135M-Instruct bf16 checkpoint is built from the
bundled GGUF (as the tests do). Absolute numbers on a shared machine are
noise; only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("ours", "ours-fp32", "plain")
DEFAULT_DATA = "alpaca-seed"  # the Stanford seed tasks shipped in the package


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="HF checkpoint directory (default: SmolLM2-135M-Instruct built from the bundled GGUF)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca data (default: alpaca-seed, built in)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side, after one untimed (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="longest example in tokens (default 256)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps of each side's peak-RSS run (default 3)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a child process
    p.add_argument("--stepper", action="store_true", help=argparse.SUPPRESS)  # the child steps when told
    args = p.parse_args()
    if args.child:
        set_up_process(args.child)
        if args.stepper:
            return step_when_told(args)
        print(json.dumps(measure_memory(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        args.base = args.base or str(build_base(Path(tmp) / "smollm2-hf"))
        speed = measure_speed(args)
        memory = {side: run_child(side, args) for side in SIDES}
    for side in SIDES:
        s, m = speed[side], memory[side]
        print(
            f"{side:>5}: {s['tokens_per_second']:7.1f} non-padding tokens/s, {s['padding_fraction']:.0%} padding; "
            f"alone: peak RSS {m['peak_rss'] / 2**20:.0f} MiB, loss after {args.memory_steps} steps {m['loss']:.4f}"
        )
    ours, plain = speed["ours"]["tokens_per_second"], speed["plain"]["tokens_per_second"]
    fp32 = speed["ours-fp32"]["tokens_per_second"]
    rss_ours, rss_plain = memory["ours"]["peak_rss"], memory["plain"]["peak_rss"]
    print(f"ours computes in {speed['precision']}")
    print(f"training throughput, ours / plain: {ours / plain:.2f}x (target >= 2.5); "
          f"ours-fp32 / plain: {fp32 / plain:.2f}x; ours / ours-fp32: {ours / fp32:.2f}x")
    print(f"peak RSS, ours / plain: {rss_ours / rss_plain:.2f}x ({rss_ours / 2**20:.0f} vs {rss_plain / 2**20:.0f} MiB)"
          " (target <= 0.6)")
    return 0


def build_base(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_export import in_child  # the export benchmark's builder (the tests' recipe), in a child

    in_child("--build-checkpoint-into", str(out))
    return out


def child_argv(child: str, args) -> list[str]:
    return [sys.executable, __file__, "--child", child, "--base", args.base, "--data", args.data,
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--memory-steps", str(args.memory_steps)]


def run_child(child: str, args) -> dict:
    proc = subprocess.run(child_argv(child, args), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{child} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_speed(args) -> dict:
    """Every side in its own process, stepping in lockstep on the same batches (alternating order)."""
    steppers = {
        side: subprocess.Popen([*child_argv(side, args), "--stepper"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        for side in SIDES
    }
    ready = {side: _reply(proc, side) for side, proc in steppers.items()}
    seconds, timed_tokens = dict.fromkeys(SIDES, 0.0), dict.fromkeys(SIDES, 0)
    for step in range(args.steps + 1):
        for side in SIDES if step % 2 == 0 else SIDES[::-1]:
            proc = steppers[side]
            proc.stdin.write(f"{step}\n")
            proc.stdin.flush()
            done = _reply(proc, side)
            if step > 0:  # the first step pays for one-off setup
                seconds[side] += done["seconds"]
                timed_tokens[side] += done["tokens"]
    last = {side: _finish(proc, side) for side, proc in steppers.items()}
    return {
        "precision": ready["ours"]["precision"],
        **{
            side: {"tokens_per_second": timed_tokens[side] / seconds[side], "padding_fraction": last[side]["padding"]}
            for side in SIDES
        },
    }


def _reply(proc, side: str) -> dict:
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"{side} failed ({proc.wait()}); run it alone with --child {side} to see why")
    return json.loads(line)


def _finish(proc, side: str) -> dict:
    proc.stdin.write("end\n")
    proc.stdin.flush()
    result = _reply(proc, side)
    proc.wait()
    return result


# -- in the child processes ----------------------------------------------------------


def set_up_process(side: str) -> None:
    """What `alpaca-convert finetune` does to its process before training: ours only."""
    if side.startswith("ours"):
        from convert.allocator import keep_freed_memory

        keep_freed_memory()


class CountingCollator:
    """Wraps a collator; counts the real (non-padding) tokens and the positions it hands out."""

    def __init__(self, inner, to_features=lambda examples: examples):
        self.inner, self.to_features = inner, to_features
        self.real = self.positions = 0

    def __call__(self, examples):
        batch = self.inner(self.to_features(examples))
        self.real += sum(len(e) for e in examples)
        self.positions += batch["input_ids"].numel()
        return batch


def build_side(side: str, args, workdir: Path, steps: int, *, autocast_by_trainer: bool = True):
    """(trainer, collator, examples, precision) for one side, from the same model, data and seed.

    With `autocast_by_trainer` False the Trainer is built for fp32 and the caller autocasts (one_step
    does, as the Trainer's bf16 setting would)."""
    import transformers

    from convert import data, finetune, model_loading

    config = finetune.FinetuneConfig(
        base=args.base, data=args.data, out=workdir, max_steps=steps, batch_size=args.batch_size, grad_accum=1,
        max_length=args.max_length, val_size=0, save_steps=10**6, learning_rate=1e-3, lr_scheduler="constant",
    )
    base = model_loading.resolve_base(config.base)
    tokenizer = model_loading.load_tokenizer(base)
    prepared = data.prepare_data(config, tokenizer, config.max_length)
    transformers.set_seed(config.seed)
    precision = finetune.pick_precision("auto", "cpu") if side == "ours" else "fp32"
    model = model_loading.load_model(base, "cpu", dtype=model_loading.FROZEN_DTYPES[precision])
    model = finetune.add_lora(model, finetune.lora_settings("llama", config))
    training_args = finetune.training_arguments(
        config, workdir, "cpu", prepared, resuming=False, precision=precision if autocast_by_trainer else "fp32"
    )
    training_args.save_strategy = "no"
    common = dict(model=model, args=training_args, train_dataset=prepared.train)
    if side.startswith("ours"):
        collator = CountingCollator(finetune.PackedCollator())
        trainer = finetune.PackedTrainer(
            data_collator=collator, chunk_tokens=max(config.max_length, finetune.PACKED_ROW_TOKENS), **common
        )
    else:
        padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        collator = CountingCollator(padded, _as_features)
        trainer = transformers.Trainer(data_collator=collator, **common)
    return trainer, collator, prepared.train, precision


def step_when_told(args) -> int:
    """One side: build it, then one training step per line on stdin ("end" stops); each step's
    seconds and real tokens go to stdout as a JSON line. Every side draws the same batches."""
    _quiet()
    with tempfile.TemporaryDirectory(prefix=f"bench-speed-{args.child}-") as tmp:
        trainer, collator, examples, precision = build_side(
            args.child, args, Path(tmp), args.steps + 1, autocast_by_trainer=False  # one_step autocasts
        )
        rng = random.Random(0)
        batches = [rng.sample(examples, args.batch_size) for _ in range(args.steps + 1)]
        print(json.dumps({"precision": precision}), flush=True)
        for line in sys.stdin:
            if line.strip() == "end":
                break
            real_before = collator.real
            started = time.perf_counter()
            one_step(trainer, collator(batches[int(line)]), precision)
            seconds = time.perf_counter() - started
            print(json.dumps({"seconds": seconds, "tokens": collator.real - real_before}), flush=True)
        print(json.dumps({"padding": 1 - collator.real / collator.positions}), flush=True)
    return 0


def one_step(trainer, inputs, precision: str = "fp32") -> None:
    """What Trainer.train does for one optimizer step without gradient accumulation (autocast as
    the Trainer's bf16 setting would)."""
    import contextlib

    import torch

    if trainer.optimizer is None:
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with cast:
        trainer.training_step(trainer.model, inputs)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure_memory(args) -> dict:
    """One side alone, through Trainer.train: its peak RSS and final loss."""
    import resource

    _quiet()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.child}-") as tmp:
        trainer, _, _, _ = build_side(args.child, args, Path(tmp), args.memory_steps)
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loss": losses[-1]}


def _quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _as_features(examples) -> list[dict]:
    return [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
