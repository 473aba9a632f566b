"""alpaca-convert's LoRA training loop vs a plain padded Trainer loop, in one run.

    python benchmarks/bench_finetune.py [--base DIR] [--data FILE] [--steps 6] [--batch-size 8] [--rounds 1]

Both sides train the same LoRA (same model, data, seed, batches, optimizer and
steps), each in its own process so that peak RSS is its own:
  - ours: every batch packed into one row (no padding), logits only where a
    token is trained on (alpaca-convert finetune);
  - plain: transformers' Trainer with DataCollatorForSeq2Seq padding each
    batch to its longest example, loss from the model (the usual recipe).

Prints training throughput in non-padding tokens/s, ours / plain (target
>= 1.3), the same per CPU-second of the process (steadier when other work
shares the cores), and each side's peak RSS. Without --base, a SmolLM2-135M-Instruct bf16
checkpoint is built from the bundled GGUF (as the tests do). Absolute numbers
on a shared machine are noise; only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ours", "plain", "ours-chunked")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_seed_tasks.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="HF checkpoint directory (default: SmolLM2-135M-Instruct built from the bundled GGUF)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Alpaca data (default: ../shared/data/alpaca_seed_tasks.json)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per side; the first is not timed (default 6)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="longest example in tokens (default 256)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, alternating which side goes first (default 1)")
    p.add_argument("--chunked", action="store_true", help="also time ours with rows cut into --max-length chunks")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one side, in a child process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(train_one(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        base = args.base or str(build_base(Path(tmp) / "smollm2-hf"))
        variants = ["ours", "plain", *(["ours-chunked"] if args.chunked else [])]
        results = {variant: [] for variant in variants}
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                result = run_child(variant, base, args)
                results[variant].append(result)
                print(
                    f"round {round_ + 1} {variant:>12}: {result['tokens_per_second']:7.1f} non-padding tokens/s "
                    f"({result['tokens_per_cpu_second']:.1f} per CPU-second), "
                    f"{result['padding_fraction']:.0%} padding, final loss {result['loss']:.4f}, "
                    f"peak RSS {result['peak_rss'] / 2**20:.0f} MiB",
                    flush=True,
                )
    speed = {v: statistics.median(r["tokens_per_second"] for r in rs) for v, rs in results.items()}
    cpu = {v: statistics.median(r["tokens_per_cpu_second"] for r in rs) for v, rs in results.items()}
    rss = {v: max(r["peak_rss"] for r in rs) for v, rs in results.items()}
    ours, plain = speed["ours"], speed["plain"]
    print(f"training throughput, ours / plain: {ours / plain:.2f}x (target >= 1.3)  [{ours:.1f} vs {plain:.1f} tokens/s]")
    print(f"per CPU-second (steadier on a shared machine): {cpu['ours'] / cpu['plain']:.2f}x")
    print(f"peak RSS: ours {rss['ours'] / 2**20:.0f} MiB, plain {rss['plain'] / 2**20:.0f} MiB ({rss['ours'] / rss['plain']:.2f}x)")
    if "ours-chunked" in speed:
        print(f"rows cut into --max-length chunks / ours: {speed['ours-chunked'] / ours:.2f}x throughput, "
              f"{rss['ours-chunked'] / rss['ours']:.2f}x peak RSS")
    return 0


def build_base(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_export import build_checkpoint  # the export benchmark's builder: the tests' recipe, in a child

    return build_checkpoint(out)


def run_child(variant: str, base: str, args) -> dict:
    argv = [sys.executable, __file__, "--variant", variant, "--base", base, "--data", args.data,
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{variant} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# -- one side, in its own process -----------------------------------------------------


class CountingCollator:
    """Wraps a collator; counts the real (non-padding) tokens and the padded positions it hands out."""

    def __init__(self, inner, to_features):
        self.inner, self.to_features = inner, to_features
        self.real: list[int] = []  # per batch, in the order the steps take them
        self.positions = 0

    def __call__(self, examples):
        batch = self.inner(self.to_features(examples))
        self.real.append(sum(len(e) for e in examples))
        self.positions += batch["input_ids"].numel()
        return batch


class StepClock:
    """Times the steps after the first few (which pay for one-off kernel setup): wall, CPU and tokens."""

    def __init__(self, collator: CountingCollator, warmup_steps: int):
        from transformers import TrainerCallback

        self.collator, self.warmup_steps = collator, warmup_steps
        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == clock.warmup_steps:
                    clock.start = (time.perf_counter(), time.process_time(), state.global_step)

            def on_train_end(self, args, state, control, **kwargs):
                clock.end = (time.perf_counter(), time.process_time(), state.global_step)

        self.callback = Callback()

    def measured(self) -> tuple[float, float, int]:
        """Seconds, CPU seconds and non-padding tokens of the timed steps (one batch a step)."""
        (w0, c0, s0), (w1, c1, s1) = self.start, self.end
        return w1 - w0, c1 - c0, sum(self.collator.real[s0:s1])


def train_one(args) -> dict:
    import resource
    import warnings

    import transformers

    from convert import finetune

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.variant}-") as tmp:
        config = finetune.FinetuneConfig(
            base=args.base, data=args.data, out=Path(tmp), max_steps=args.steps, batch_size=args.batch_size,
            grad_accum=1, max_length=args.max_length, val_size=0, save_steps=10**6, learning_rate=1e-3,
        )
        base = finetune.resolve_base(config.base)
        tokenizer = finetune.load_tokenizer(base)
        prepared = finetune.prepare_data(config, tokenizer, config.max_length)
        transformers.set_seed(config.seed)
        model = finetune.add_lora(finetune.load_model(base, "cpu"), finetune.lora_settings("llama", config))
        training_args = finetune.training_arguments(config, Path(tmp), "cpu", prepared, resuming=False)
        training_args.save_strategy = "no"
        common = dict(model=model, args=training_args, train_dataset=prepared.train)
        if args.variant == "plain":
            padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
            collator = CountingCollator(padded, _as_features)
            trainer = transformers.Trainer(data_collator=collator, **common)
        else:
            collator = CountingCollator(finetune.PackedCollator(), lambda examples: examples)
            chunk_tokens = max(config.max_length, finetune.PACKED_ROW_TOKENS) if args.variant == "ours" else args.max_length
            trainer = finetune.PackedTrainer(data_collator=collator, chunk_tokens=chunk_tokens, **common)
        clock = StepClock(collator, warmup_steps=1)
        trainer.add_callback(clock.callback)
        trainer.train()
        seconds, cpu_seconds, tokens = clock.measured()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "tokens_per_second": tokens / seconds,
        "tokens_per_cpu_second": tokens / cpu_seconds,
        "padding_fraction": 1 - sum(collator.real) / collator.positions,
        "seconds": seconds,
        "loss": losses[-1],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _as_features(examples) -> list[dict]:
    return [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
