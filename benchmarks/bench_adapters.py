"""LoRA adapters at run time against the merged model they stand for, in one run (issue 21, targets 1-3).

    python benchmarks/bench_adapters.py [--model PATH_OR_NAME] [--adapter A.gguf --merged M.gguf]
                                        [--rounds 5] [--gen 64] [--prompt-words 200]

Without --adapter, a rank-8 adapter on every layer's attn_q and attn_v (peft's default targets for
llama-family models) is written for the model with random weights, and the merged model it stands
for (the changed weights requantized to their own type, as a merged, quantized fine-tune would be).
With --adapter/--merged (e.g. `alpaca-convert export-adapter`'s output and the pipeline's merged
Q4_K_M), those files are compared.

Prints, as ratios of medians over rounds whose order alternates:
  1. adapter file size / merged model file size           (target <= 5 %)
  2. switching the adapter on/off in a running engine      (target <= 50 ms), against loading the merged model
  3. generation tok/s, base + adapter / merged              (target >= 0.85); prompt processing tok/s too
Absolute times on a shared machine are noise; the ratios are what the rounds compare. `uptime` is printed.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from adapter_helpers import deltas, random_pairs, write_adapter, write_merged  # noqa: E402
from alpaca_chat.conversation import SamplingParams  # noqa: E402
from alpaca_chat.engine import AdapterSpec, BaseLayout, Engine  # noqa: E402
from alpaca_chat.models import resolve_model  # noqa: E402

N_CTX = 1024


def synthetic_files(model: Path, out: Path, rank: int) -> tuple[Path, Path]:
    layout = BaseLayout.of_model(model)
    names = [n for n in layout.tensors if n.endswith(("attn_q.weight", "attn_v.weight"))]
    pairs = random_pairs(layout, names, rank=rank, std=0.02, seed=0)
    adapter = write_adapter(out / "bench-adapter.gguf", layout.architecture, pairs, alpha=2.0 * rank,
                            dtype="float16")
    merged = write_merged(out / "bench-merged.gguf", model, deltas(pairs, alpha=2.0 * rank), requantize=True)
    return adapter, merged


def prompt_text(words: int) -> str:
    body = " ".join(f"word{i % 97}" for i in range(words))
    return f"<|im_start|>user\nSummarise: {body}<|im_end|>\n<|im_start|>assistant\n"


def speeds(engine: Engine, prompt: str, gen: int) -> tuple[float, float]:
    """(prompt tok/s on a cold cache, generation tok/s) of one greedy reply of `gen` tokens."""
    engine.reset()
    reply = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=gen, repeat_penalty=1.0))
    for _ in reply:
        pass
    return reply.stats.prompt_tokens_per_s, reply.stats.generation_tokens_per_s


def switch_ms(engine: Engine, spec: AdapterSpec, times: int = 10) -> float:
    """Median time to turn the adapter on, then off (the file is loaded once, before)."""
    samples = []
    for _ in range(times):
        for specs in ([spec], []):
            started = time.perf_counter()
            engine.set_adapters(specs)
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def load_ms(path: Path) -> float:
    started = time.perf_counter()
    with Engine(path, n_ctx=N_CTX):
        loaded = time.perf_counter()
    return (loaded - started) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the base GGUF (default: the bundled model)")
    p.add_argument("--adapter", type=Path, help="an adapter GGUF for the model (default: a synthetic one)")
    p.add_argument("--merged", type=Path, help="the merged model the adapter stands for (with --adapter)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=200)
    args = p.parse_args()
    if (args.adapter is None) != (args.merged is None):
        p.error("--adapter and --merged go together")
    model = resolve_model(args.model).path
    print(f"uptime: {os.popen('uptime').read().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter is None:
            started = time.perf_counter()
            adapter, merged = synthetic_files(model, Path(tmp), args.rank)
            print(f"wrote a synthetic rank-{args.rank} adapter (attn_q, attn_v of every layer) and its merged model "
                  f"in {time.perf_counter() - started:.1f} s")
        else:
            adapter, merged = args.adapter, args.merged
        run(model, adapter, merged, args)
    return 0


def run(model: Path, adapter: Path, merged: Path, args) -> None:
    size_ratio = adapter.stat().st_size / merged.stat().st_size
    print(f"model {model.name}; adapter {adapter.name} {adapter.stat().st_size / 1e6:.2f} MB; "
          f"merged {merged.name} {merged.stat().st_size / 1e6:.1f} MB")
    spec = AdapterSpec(adapter)
    prompt = prompt_text(args.prompt_words)
    base = Engine(model, n_ctx=N_CTX)
    started = time.perf_counter()
    base.set_adapters([spec])  # the first time: checked and loaded
    first_ms = (time.perf_counter() - started) * 1000
    results = {"switch": [], "load merged": [], "ours gen": [], "merged gen": [], "ours pp": [], "merged pp": []}
    merged_engine = Engine(merged, n_ctx=N_CTX)
    try:
        for i in range(args.rounds):
            order = ("ours", "merged") if i % 2 == 0 else ("merged", "ours")
            for who in order:
                if who == "ours":
                    base.set_adapters([spec])
                    pp, gen = speeds(base, prompt, args.gen)
                    results["switch"].append(switch_ms(base, spec))
                else:
                    pp, gen = speeds(merged_engine, prompt, args.gen)
                results[f"{who} gen"].append(gen)
                results[f"{who} pp"].append(pp)
            results["load merged"].append(load_ms(merged))
    finally:
        base.close()
        merged_engine.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"rounds: {args.rounds}, {args.gen} generated tokens, prompt of {args.prompt_words} words, order alternating")
    print(f"1. adapter size / merged size:            {size_ratio * 100:.2f} %  (target <= 5 %)")
    print(f"2. switch adapter on/off (median):        {med['switch']:.2f} ms  (target <= 50 ms); first load "
          f"{first_ms:.1f} ms; loading the merged model {med['load merged']:.0f} ms: "
          f"ratio {med['switch'] / med['load merged']:.4f}")
    print(f"3. generation tok/s base+adapter / merged: {med['ours gen']:.1f} / {med['merged gen']:.1f} = "
          f"{med['ours gen'] / med['merged gen']:.3f}  (target >= 0.85)")
    print(f"   prompt processing tok/s:               {med['ours pp']:.1f} / {med['merged pp']:.1f} = "
          f"{med['ours pp'] / med['merged pp']:.3f}")
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    sys.exit(main())
