"""Compression targets of issue 18 on the bundled SmolLM2-135M: prune, distill, quantize, measure.

    python benchmarks/bench_compress.py [--steps 60] [--learning-rate 5e-4] [--rounds 5] [--work DIR]
                                        [--plot docs/compress_size_kl.png]
    python benchmarks/bench_compress.py --speed-only --work DIR [--rounds 8]   # targets 1 and 4's speed alone

`--speed-only` times the Q4_K_M files of the teacher and the pruned models in DIR (made there if missing:
the base, the depth- and width-pruned checkpoints, their F16 and Q4_K_M GGUFs), nothing else: the
speed can be measured again on a quieter machine without training again.

1. speed follows size: a model pruned by ~25 % of its parameters (depth: whole layers) decodes at
   Q4_K_M faster than the unpruned Q4_K_M, same run, rounds alternating (median of per-round ratios);
2. distillation repairs pruning: the share of the held-out perplexity gap that pruning opened and
   distillation closed, with a fixed budget of training tokens;
3. distillation against cross-entropy training on the same text, tokens and steps (the same code:
   `--alpha 1` is plain CE): both the KL to the teacher and the held-out perplexity;
4. depth against width pruning at equal parameter count: perplexity, KL, speed.

SmolLM2-135M's hidden size, 576, is not a multiple of 256, so llama.cpp's K-quants fall back to 32-blocks
(Q5_0 for Q4_K_M's attention and FFN input matrices); only rows of a multiple of 256 (the FFN's down
projection, 1536 wide) take Q4_K/Q6_K. A width-pruned FFN of a multiple of 64 loses that too, which changes
the speed as much as the size does. So the speed table gives each file's tensor types, and a second
width-pruned model keeps its FFN at a multiple of 256 ("width-256").

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
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed reply (sampled, seed = round)")
    p.add_argument("--speed-only", action="store_true", help="only time the Q4_K_M files (made in --work if missing)")
    p.add_argument("--drop-layers", type=int, default=10, help="depth pruning: layers removed (10 of 30: ~26 %% of params)")
    p.add_argument("--work", type=Path, help="keep the models here (default: a temp dir)")
    p.add_argument("--base", type=Path, help="an existing SmolLM2 HF checkpoint (default: built from the bundled GGUF)")
    args = p.parse_args()
    if args.speed_only and args.work is None:
        p.error("--speed-only reuses the models of a work directory: give --work DIR")
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"machine: {_load()}", flush=True)
        if args.speed_only:
            pruned = prune_models(args, work)
            report_speed(measure_speed(pruned, work, args.rounds, args.tokens), pruned["params"])
        else:
            run(args, work)
        print(f"machine at the end: {_load()}")
    return 0


def _load() -> str:
    import os

    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def prune_models(args, work: Path) -> dict:
    """The teacher and its pruned versions at about equal parameters (made in `work` if missing):
    depth (whole layers), width (FFN multiple of 64, as fine as the target needs) and width-256."""
    from convert.prune import PruneRequest, prune

    base = args.base or build_base(work / "smollm2-hf")
    depth = work / "pruned-depth"
    if not depth.exists():
        prune(base, depth, PruneRequest(drop_layers=args.drop_layers))
    target = json.loads((depth / "pruning.json").read_text())["params"]["after"]
    models = {"teacher": base, "depth-pruned": depth}
    for name, multiple in (("width-pruned", 64), ("width-256", 256)):
        out = work / ("pruned-width" if multiple == 64 else "pruned-width-256")
        if not out.exists():
            prune(base, out, PruneRequest(target_params=target, prefer="width", ffn_multiple=multiple))
        models[name] = out
    params = {name: _params(path) for name, path in models.items()}
    print("params: " + ", ".join(f"{name} {n:,} ({n / params['teacher'] - 1:+.1%})" for name, n in params.items()))
    return {**models, "params": params}


def report_speed(speed: dict, params: dict) -> None:
    print("\n| model | params | Q4_K_M MiB | Q4_K_M tensor types | tok/s | vs teacher (median of rounds) | per round |")
    print("|---|---:|---:|---|---:|---:|---|")
    for name, v in speed.items():
        rounds = " ".join(f"{r:.2f}" for r in v["ratios"])
        print(f"| {name} | {params[name] / 1e6:.1f} M | {v['bytes'] / 2**20:.1f} | {v['types']} | {v['tok_s']:.1f} | "
              f"{v['ratio']:.2f}x | {rounds} |")
    depth = speed["depth-pruned"]
    print(f"\n1. speed: depth-pruned ({1 - params['depth-pruned'] / params['teacher']:.0%} fewer params) decodes "
          f"{depth['ratio']:.2f}x the teacher at Q4_K_M (target >= 1.2x); width-pruned {speed['width-pruned']['ratio']:.2f}x, "
          f"width-256 {speed['width-256']['ratio']:.2f}x")


def run(args, work: Path) -> None:
    from convert.distill import CACHE_DIR, DistillSettings, distill
    from convert.distill_pipeline import measure_quality
    from convert.finetune_config import FinetuneConfig

    started = time.perf_counter()
    pruned = prune_models(args, work)
    base, depth, width = pruned["teacher"], pruned["depth-pruned"], pruned["width-pruned"]
    depth_params = json.loads((depth / "pruning.json").read_text())["params"]
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
    timed = measure_speed(pruned, work, args.rounds, args.tokens)
    report_speed(timed, pruned["params"])
    speed = {name: (v["tok_s"], v["ratio"]) for name, v in timed.items()}

    params = {name: _params(path) for name, path in models.items()}
    sizes = {name: v["bytes"] for name, v in timed.items()}
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
               "speed": {k: {"tok_s": v["tok_s"], "ratio": v["ratio"], "tensor_types": v["types"]} for k, v in timed.items()},
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


def measure_speed(models: dict, work: Path, rounds: int, tokens: int) -> dict:
    """Q4_K_M decode tokens/s through the engine (convert/compression_report.decode_rates, the report's
    method): per round every model once, the order alternating. A round counts only if every model
    wrote at least a quarter of the tokens (a reply ending at once times nothing). Each model's ratio
    is the median of its per-round ratios to the teacher."""
    from convert import compression_report
    from convert.export import export
    from convert.quantize import quantize

    ggufs = {}
    for name, path in models.items():
        if name == "params":
            continue
        q4 = work / f"{name}.Q4_K_M.gguf"
        if not q4.exists():
            f16 = export(path, work / f"{name}.F16.gguf", "f16").path
            quantize(f16, q4, "Q4_K_M")
        ggufs[name] = q4
    runs = compression_report.decode_rates(ggufs, tokens=tokens, rounds=rounds)
    least = max(16, tokens // 4)
    kept = [r for r in range(rounds) if all(v[r][1] >= least for v in runs.values())]
    if not kept:
        sys.exit(f"speed: no round where every model wrote {least} tokens")
    out = {}
    for name, v in runs.items():
        ratios = [v[r][0] / runs["teacher"][r][0] for r in kept]
        out[name] = {"tok_s": statistics.median(v[r][0] for r in kept), "ratio": statistics.median(ratios),
                     "ratios": ratios, "bytes": ggufs[name].stat().st_size,
                     "types": compression_report.tensor_types(ggufs[name])}
    print(f"speed: {len(kept)} of {rounds} rounds counted (each model at least {least} tokens); tokens per "
          "round: " + "; ".join(f"{name} {' '.join(str(n) for _, n in v)}" for name, v in runs.items()))
    return out


if __name__ == "__main__":
    sys.exit(main())
