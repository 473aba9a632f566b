"""Self-instruct throughput: the same teacher requests decoded K at a time, K = 1, 2, 4, 8.

    python benchmarks/bench_generate.py [--requests 8] [--max-tokens 256] [--model PATH]
    python benchmarks/bench_generate.py --grammar-compare [--requests 20] [--parallel 4]

Each K runs the same R requests (same prompts, same sampling seeds) on the
bundled model through Engine.generate_parallel, then parses and filters the
answers as `alpaca-convert generate` does. It prints generated tokens/s and
tasks accepted per minute for each K, and the ratio to K = 1. K = 1 runs first
and last; its mean is the reference, so a machine that slows down during the
run shows up as a gap between the two. Target: >= 1.7x at K = 8.

`--grammar-compare` runs the same requests at one K with and without the task-format grammar
(`alpaca-convert generate`'s default, `GenerateOptions.grammar`) and reports, each way, the
share of answers that parse into tasks, the share of candidate tasks accepted, and tasks/min
(issue 20, target 5: >= 90 % of answers parse with the grammar).
"""

from __future__ import annotations

import argparse
import random
import time

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine, ParallelRequest
from alpaca_chat.loading import choose_template
from alpaca_chat.models import resolve_model
from alpaca_chat.engine.grammar import numbered_records_grammar
from convert.generate import RougeIndex, build_request, load_seed_tasks, normalize, parse_tasks, rejection


def requests_for(engine, template, n_requests: int, max_tokens: int, seed: int = 0,
                 grammar: bool = False) -> list[ParallelRequest]:
    rng = random.Random(seed)
    seeds = load_seed_tasks("alpaca-seed")
    out = []
    for _ in range(n_requests):
        message, start = build_request(rng.sample(seeds, 3), 5)
        prompt = template.render([Message("user", message)], add_generation_prompt=True) + start
        sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=0, min_p=0.0, repeat_penalty=1.0,
                                  seed=rng.randrange(2**32), max_tokens=max_tokens,
                                  grammar=numbered_records_grammar(["Instruction", "Input", "Output"], 4, 5)
                                  if grammar else None)
        out.append(ParallelRequest(engine.tokenize(prompt), sampling, tag=start))
    return out


def run_once(path, k: int, n_requests: int, max_tokens: int, threads: int | None,
             grammar: bool = False, counts: dict | None = None) -> tuple[float, float]:
    """(generated tokens/s, tasks accepted per minute) for K parallel sequences; `counts` gets the
    answers, those parsed into tasks, the candidates and the accepted tasks."""
    counts = counts if counts is not None else {}
    counts.update(answers=0, parsed=0, candidates=0, accepted=0, truncated=0)
    with Engine(path, n_ctx=k * 2048, n_seq_max=k, n_threads=threads) as engine:
        template = choose_template(engine, "auto", None)
        queue = iter(requests_for(engine, template, n_requests, max_tokens, grammar=grammar))
        seeds = load_seed_tasks("alpaca-seed")
        seed_texts = {normalize(s.instruction) for s in seeds}
        index = RougeIndex()
        for s in seeds:
            index.add(s.instruction)
        tokens = accepted = 0
        started = time.perf_counter()
        for result in engine.generate_parallel(lambda: next(queue, None)):
            tokens += result.stats.generated_tokens
            tasks, cut = parse_tasks(result.request.tag + result.text, truncated=result.stats.stop_reason == "length")
            counts["answers"] += 1
            counts["parsed"] += bool(tasks)
            counts["candidates"] += len(tasks)
            counts["truncated"] += cut
            for task in tasks:
                if rejection(task, seed_texts) is None and not index.too_similar(task.instruction):
                    index.add(task.instruction)
                    accepted += 1
        counts["accepted"] = accepted
        elapsed = time.perf_counter() - started
    return tokens / elapsed, accepted / elapsed * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--model", help="teacher GGUF (default: the bundled model)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--grammar-compare", action="store_true", help="with and without the task grammar")
    parser.add_argument("--parallel", type=int, default=4, help="K for --grammar-compare")
    args = parser.parse_args()
    path = resolve_model(args.model).path
    if args.grammar_compare:
        return grammar_compare(path, args)
    print(f"teacher {path.name}, {args.requests} requests of up to {args.max_tokens} tokens each")
    order = [1, 2, 4, 8, 1]
    results: dict[int, list[tuple[float, float]]] = {}
    for k in order:
        tps, tpm = run_once(path, k, args.requests, args.max_tokens, args.threads)
        results.setdefault(k, []).append((tps, tpm))
        print(f"  K={k}: {tps:7.1f} generated tokens/s  {tpm:6.1f} tasks accepted/min", flush=True)
    ref_tps = sum(r[0] for r in results[1]) / len(results[1])
    ref_tpm = sum(r[1] for r in results[1]) / len(results[1])
    print(f"K=1 reference (mean of first and last run): {ref_tps:.1f} tokens/s, {ref_tpm:.1f} tasks/min "
          f"(first/last {results[1][0][0]:.1f}/{results[1][1][0]:.1f} tokens/s)")
    print("| K | tokens/s | ratio to K=1 | tasks accepted/min |")
    print("|---|---|---|---|")
    for k in (1, 2, 4, 8):
        tps, tpm = results[k][0] if k != 1 else (ref_tps, ref_tpm)
        print(f"| {k} | {tps:.1f} | {tps / ref_tps:.2f}x | {tpm:.1f} |")
    ratio = results[8][0][0] / ref_tps
    print(f"K=8 / K=1 generated tokens/s: {ratio:.2f}x (target >= 1.7x)")


def grammar_compare(path, args) -> None:
    print(f"teacher {path.name}, {args.requests} requests of up to {args.max_tokens} tokens, K={args.parallel}")
    print("| grammar | answers parsed into tasks | candidates accepted | truncated tasks | tasks/min | tokens/s |")
    print("|---|---|---|---|---|---|")
    for grammar in (False, True):
        counts: dict = {}
        tps, tpm = run_once(path, args.parallel, args.requests, args.max_tokens, args.threads, grammar, counts)
        print(f"| {'yes' if grammar else 'no'} | {counts['parsed']}/{counts['answers']} "
              f"({counts['parsed'] / max(counts['answers'], 1):.0%}) | {counts['accepted']}/{counts['candidates']} "
              f"({counts['accepted'] / max(counts['candidates'], 1):.0%}) | {counts['truncated']} | {tpm:.1f} | "
              f"{tps:.1f} |", flush=True)


if __name__ == "__main__":
    main()
