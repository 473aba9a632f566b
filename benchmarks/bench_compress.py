"""Compression targets of issue 18 on the bundled SmolLM2-135M: prune, distill, quantize, measure.

    python benchmarks/bench_compress.py [--steps 60] [--learning-rate 5e-4] [--rounds 5] [--work DIR]
                                        [--plot docs/compress_size_kl.png]

1. speed follows size: a model pruned by ~25 % of its parameters (depth: whole layers) decodes at
   Q4_K_M faster than the unpruned Q4_K_M, same run, rounds alternating (median of per-round ratios);
2. distillation repairs pruning: the share of the held-out perplexity gap that pruning opened and
   distillation closed, with a fixed budget of training tokens;
3. distillation against cross-entropy training on the same text, tokens and steps (the same code:
   `--alpha 1` is plain CE): both the KL to the teacher and the held-out perplexity;
4. depth against width pruning at equal parameter count: perplexity, KL, speed.

Held-out text: convert/eval_sample.txt, which neither the pruning calibration text (convert/builtin_data/
calibration_prune.txt) nor the training text (default: convert/builtin_data/calibration.txt, the
imatrix calibration prose, every token trained on; or `--data alpaca-seed`) shares a sentence with. Perplexity
and KL are computed with transformers in float32 over the whole text (one sequence); speed through
alpaca-chat's engine at Q4_K_M. Machines here are shared and noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="distillation / CE steps (max length 256)")
    p.add_argument("--batch-size", type=int, default=4, help="examples (of up to 256 tokens) per step")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="full-parameter student's peak LR (cosine)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--data", default=str(ROOT / "convert" / "builtin_data" / "calibration.txt"),
                   help="training text for both runs: a .txt file or alpaca-seed")
    p.add_argument("--distilled", type=Path, help="measure this trained student (e.g. a checkpoint) instead of training")
    p.add_argument("--ce", type=Path, help="with --distilled: the CE-trained student trained alike")
    p.add_argument("--plot", type=Path, help="write the size-vs-KL PNG here")
    p.add_argument("--rounds", type=int, default=5, help="speed rounds (each model once per round)")
    p.add_argument("--drop-layers", type=int, default=10, help="depth pruning: layers removed (10 of 30: ~26 %% of params)")
    p.add_argument("--work", type=Path, help="keep the models here (default: a temp dir)")
    p.add_argument("--base", type=Path, help="an existing SmolLM2 HF checkpoint (default: built from the bundled GGUF)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run(args, work)
    return 0


def run(args, work: Path) -> None:
    from convert.distill import CACHE_DIR, DistillSettings, distill
    from convert.finetune_config import FinetuneConfig
    from convert.prune import PruneRequest, prune

    started = time.perf_counter()
    base = args.base or build_base(work / "smollm2-hf")
    depth = work / "pruned-depth"
    if not depth.exists():
        prune(base, depth, PruneRequest(drop_layers=args.drop_layers))
    depth_params = json.loads((depth / "pruning.json").read_text())["params"]
    width = work / "pruned-width"
    if not width.exists():
        prune(base, width, PruneRequest(target_params=depth_params["after"], prefer="width", ffn_multiple=64))
    width_params = json.loads((width / "pruning.json").read_text())["params"]
    print(f"params: teacher {depth_params['before']:,}; depth-pruned {depth_params['after']:,} "
          f"({1 - depth_params['after'] / depth_params['before']:.1%} fewer); width-pruned {width_params['after']:,}")

    runs = {}
    for name, alpha in () if args.distilled else (("distilled", 0.0), ("ce-trained", 1.0)):
        out = work / name
        shared = work / "distilled" / CACHE_DIR
        if name != "distilled" and shared.is_dir() and not (out / CACHE_DIR).exists():
            out.mkdir(parents=True, exist_ok=True)  # the same teacher, data and k: the same cache key
            (out / CACHE_DIR).symlink_to(shared.resolve(), target_is_directory=True)
        if not (out / "config.json").exists():
            config = FinetuneConfig(base=str(depth), data=args.data, out=out, max_steps=args.steps, batch_size=args.batch_size,
                                    grad_accum=1, max_length=256, val_size=0.0, learning_rate=args.learning_rate,
                                    save_steps=10_000, warmup_ratio=0.05, seed=0)
            runs[name] = distill(config, DistillSettings(teacher=str(base), alpha=alpha, temperature=args.temperature,
                                                         top_k=64, full=True), progress=True)
    print(f"trained {args.steps} steps of {args.batch_size} x 256 tokens each at LR {args.learning_rate:g}, T {args.temperature:g}, data "
          f"{Path(args.data).name} ({time.perf_counter() - started:.0f} s so far)", flush=True)

    text = (ROOT / "convert" / "eval_sample.txt").read_text(encoding="utf-8")
    models = {"teacher": base, "depth-pruned": depth, "width-pruned": width,
              "depth+distilled": args.distilled or work / "distilled", "depth+CE": args.ce or work / "ce-trained"}
    quality = measure_quality(models, base, text)
    speed = measure_speed({k: models[k] for k in ("teacher", "depth-pruned", "width-pruned")}, work, args.rounds)

    params = {name: _params(path) for name, path in models.items()}
    sizes = {name: (work / f"{name}.Q4_K_M.gguf").stat().st_size for name in speed}
    print("\n| model | params | Q4_K_M MiB | Q4_K_M tok/s (vs teacher) | held-out ppl | KL to teacher |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        ppl, kl = quality[name]
        tok = f"{speed[name][0]:.1f} ({speed[name][1]:.2f}x)" if name in speed else "as depth-pruned"
        size = f"{sizes[name] / 2**20:.0f}" if name in sizes else "as depth-pruned"
        print(f"| {name} | {params[name] / 1e6:.1f} M | {size} | {tok} | {ppl:.2f} | {kl:.4f} |")
    t_ppl, p_ppl, d_ppl, c_ppl = (quality[k][0] for k in ("teacher", "depth-pruned", "depth+distilled", "depth+CE"))
    recovered = (p_ppl - d_ppl) / (p_ppl - t_ppl) if p_ppl > t_ppl else float("nan")
    recovered_ce = (p_ppl - c_ppl) / (p_ppl - t_ppl) if p_ppl > t_ppl else float("nan")
    print(f"\n1. speed: depth-pruned ({1 - depth_params['after'] / depth_params['before']:.0%} fewer params) decodes "
          f"{speed['depth-pruned'][1]:.2f}x the teacher at Q4_K_M (target >= 1.2x)")
    print(f"2. distillation recovers {recovered:.0%} of the perplexity gap pruning opened "
          f"({t_ppl:.2f} -> {p_ppl:.2f} -> {d_ppl:.2f}; target >= 50 %; CE on the same text: {recovered_ce:.0%})")
    print(f"3. distill vs CE, same {args.steps} steps: KL {quality['depth+distilled'][1]:.4f} vs "
          f"{quality['depth+CE'][1]:.4f}, ppl {d_ppl:.2f} vs {c_ppl:.2f} (target: both lower)")
    print(f"4. depth vs width at ~equal params ({depth_params['after']:,} vs {width_params['after']:,}): ppl "
          f"{p_ppl:.2f} vs {quality['width-pruned'][0]:.2f}, KL {quality['depth-pruned'][1]:.4f} vs "
          f"{quality['width-pruned'][1]:.4f}, speed {speed['depth-pruned'][1]:.2f}x vs {speed['width-pruned'][1]:.2f}x")
    print(f"   ratios: ppl KL distilled/CE {d_ppl / c_ppl:.3f} {quality['depth+distilled'][1] / quality['depth+CE'][1]:.3f}; "
          f"width/depth ppl {quality['width-pruned'][0] / p_ppl:.3f}, KL "
          f"{quality['width-pruned'][1] / quality['depth-pruned'][1]:.3f}")
    results = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "temperature": args.temperature,
               "data": Path(args.data).name, "params": params, "q4_k_m_bytes": sizes,
               "quality": {k: {"ppl": v[0], "kl": v[1]} for k, v in quality.items()},
               "speed": {k: {"tok_s": v[0], "ratio": v[1]} for k, v in speed.items()},
               "seconds": round(time.perf_counter() - started)}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    print(f"total {time.perf_counter() - started:.0f} s")


def _params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += _prod(f.get_slice(name).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plot(results: dict, out: Path) -> None:
    """Size (parameters) against KL to the teacher; marker area ~ Q4_K_M decode speed, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    speed = results["speed"]
    for name, q in results["quality"].items():
        shown = speed.get(name) or speed.get("depth-pruned")  # trained students: the depth-pruned shape
        x, y = results["params"][name] / 1e6, q["kl"]
        ax.scatter([x], [y], s=60 * shown["ratio"] ** 2, alpha=0.7)
        ax.annotate(f"{name}\n{shown['tok_s']:.0f} tok/s ({shown['ratio']:.2f}x)", (x, y),
                    textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("KL to the teacher (held-out text, nats/token)")
    ax.set_title(f"SmolLM2-135M: size vs KL (marker area ~ Q4_K_M decode speed); {results['steps']} steps")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def build_base(out: Path) -> Path:
    if not (out / "config.json").exists():
        from bench_export import in_child  # the export benchmark's builder (the tests' recipe), in a child

        in_child("--build-checkpoint-into", str(out))
    return out


def measure_quality(models: dict, teacher: Path, text: str) -> dict:
    """(perplexity, mean KL(teacher || model)) on `text`, float32, one sequence."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher)
    ids = torch.tensor([tokenizer(text)["input_ids"][:2048]])

    def log_probs(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(input_ids=ids).logits[0, :-1].log_softmax(-1)

    reference = log_probs(teacher)
    targets = ids[0, 1:]
    out = {}
    for name, path in models.items():
        lp = reference if name == "teacher" else log_probs(path)
        ppl = float(torch.exp(-lp.gather(-1, targets[:, None]).mean()))
        kl = float((reference.exp() * (reference - lp)).sum(-1).mean())
        out[name] = (ppl, kl)
    return out


def measure_speed(models: dict, work: Path, rounds: int) -> dict:
    """Q4_K_M decode tokens/s through the engine: per round every model once (order alternating);
    the teacher's and each model's ratio is the median of the per-round ratios."""
    from alpaca_chat.conversation import SamplingParams
    from alpaca_chat.engine import Engine
    from convert.export import export
    from convert.quantize import quantize

    ggufs = {}
    for name, path in models.items():
        q4 = work / f"{name}.Q4_K_M.gguf"
        if not q4.exists():
            f16 = export(path, work / f"{name}.F16.gguf", "f16").path
            quantize(f16, q4, "Q4_K_M")
        ggufs[name] = q4
    engines = {name: Engine(path, n_ctx=512) for name, path in ggufs.items()}
    prompt = "### Instruction:\nWrite a long story about a lighthouse keeper.\n\n### Response:\n"
    # Sampled, not greedy: a pruned model's greedy reply may end at once, and tokens/s of a
    # two-token reply is noise. A round counts only if every model wrote at least 48 tokens.
    per_round = {name: [] for name in models}
    for name in models:  # warm-up
        for _ in engines[name].generate(prompt, SamplingParams(temperature=1.0, max_tokens=8, seed=0)):
            pass
    for r in range(rounds * 3):
        if len(per_round["teacher"]) >= rounds:
            break
        sampling = SamplingParams(temperature=1.0, max_tokens=128, seed=r)
        order = list(models) if r % 2 == 0 else list(reversed(list(models)))
        this_round = {}
        for name in order:
            engines[name].reset()
            generation = engines[name].generate(prompt, sampling)
            for _ in generation:
                pass
            if generation.stats.generated_tokens >= 48:
                this_round[name] = generation.stats.generation_tokens_per_s
        if len(this_round) == len(models):
            for name, value in this_round.items():
                per_round[name].append(value)
    if not per_round["teacher"]:
        sys.exit("speed: no round where every model wrote 48 tokens")
    for engine in engines.values():
        engine.close()
    return {name: (statistics.median(v), statistics.median(x / t for x, t in zip(v, per_round["teacher"])))
            for name, v in per_round.items()}


if __name__ == "__main__":
    sys.exit(main())
