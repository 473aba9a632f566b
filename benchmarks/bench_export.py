"""alpaca-convert's exporter vs llama.cpp's own converter, and the quantizer, in one run.

    python benchmarks/bench_export.py [--checkpoint DIR] [--rounds 3] [--reference-script PATH]
    python benchmarks/bench_export.py --synthetic [--size-gb 1.1] [--shards 4] [--family qwen2] [--rounds 3]

Without --checkpoint, a SmolLM2-135M-Instruct bf16 checkpoint is built from
the bundled GGUF (as the tests do). With --synthetic, a checkpoint of at least
--size-gb is synthesized instead, in --shards safetensors shards with a
`model.safetensors.index.json`: random bf16 weights in Qwen2.5-0.5B's shapes
(hidden 896, MLP 4864, 14 heads, 2 KV heads, vocabulary 151936) with untied
embeddings and as many layers as the size asks (19 for 1.1 GB), and a tiny
BPE tokenizer with Qwen2's pre-tokenizer. It is written shard by shard, so
synthesizing never holds the model in memory. `--family llama` gives the same
shapes as a LlamaForCausalLM (no q/k/v biases; q and k rows are permuted on
export, by both converters).

llama.cpp's `convert_hf_to_gguf.py` comes from the llama-cpp-python source
distribution on PyPI, found (or downloaded once) by the tests' own code,
`tests/convert_helpers.reference_converter`, in pytest's cache when the tests
have filled it, else in the user cache dir; or --reference-script points at
one. It runs through `tests/oracle_convert.py`, which for the synthetic
tokenizer answers only its pre-tokenizer hash lookup (a tokenizer trained on
the spot is in no table).

Prints, as medians over interleaved rounds, each export (HF -> F16 GGUF) run
in its own child process (peak RSS is that child's own, from wait4):
  - wall time, ours / reference (target <= 1.0)
  - peak RSS, ours / reference (target <= 0.5)
then whether both wrote the same tensor bytes, and (SmolLM2 mode)
quantization speed (F16 -> Q8_0, Q4_K_M) in seconds per GB of input, with
our overhead over a bare `llama_model_quantize` call.
Absolute times on a shared machine are noise; only same-run ratios mean anything.
This process stays small and never imports torch: Linux carries a parent's
RSS high-water mark into a child's (fork, then exec), so every heavy step
(building, synthesizing, comparing) runs in a child of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
RSS_TARGET, WALL_TARGET = 0.5, 1.0

# Qwen2.5-0.5B's config.json, less what the exporters ignore; layers and tying are set per run.
QWEN2_SHAPES = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    hidden_act="silu",
    use_sliding_window=False,
    attention_dropout=0.0,
    torch_dtype="bfloat16",
    tie_word_embeddings=False,
)


def measure(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""  # before wait: no pipe stall
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def in_child(*args: str) -> str:
    """Run this script's internal mode `args` in a child process; its stdout."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


# -- checkpoints ------------------------------------------------------------------------


def _build_checkpoint(out: Path) -> None:
    """SmolLM2-135M-Instruct in bf16, dequantized from the bundled GGUF (see DEVELOPERS.md)."""
    import torch
    import transformers

    from alpaca_chat.models import resolve_model

    gguf_path = resolve_model(None).path
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


def synthetic_layout(size_bytes: float, family: str = "qwen2") -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """Config and tensors (name, shape) of a Qwen2-shaped model of at least `size_bytes` in bf16."""
    c = dict(QWEN2_SHAPES)
    if family == "llama":
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")
    h, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = h, c["num_key_value_heads"] * (h // c["num_attention_heads"])

    def layer(b: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"model.layers.{b}."
        attention = []
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            attention.append((p + f"self_attn.{proj}_proj.weight", (rows, h)))
            if family == "qwen2":
                attention.append((p + f"self_attn.{proj}_proj.bias", (rows,)))
        return [
            (p + "input_layernorm.weight", (h,)),
            *attention,
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (ff, h)),
            (p + "mlp.up_proj.weight", (ff, h)),
            (p + "mlp.down_proj.weight", (h, ff)),
        ]

    per_layer = sum(math.prod(shape) for _, shape in layer(0))
    outside = 2 * v * h + h  # embeddings, output head, final norm
    c["num_hidden_layers"] = max(1, math.ceil((size_bytes / 2 - outside) / per_layer))
    tensors = [("model.embed_tokens.weight", (v, h))]
    for b in range(c["num_hidden_layers"]):
        tensors += layer(b)
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return c, tensors


def _synthesize(out: Path, size_gb: float, n_shards: int, family: str) -> None:
    """Write the synthetic checkpoint one shard at a time (only one shard's tensors in memory)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(TESTS))
    from convert_helpers import write_bpe_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    n_vocab = write_bpe_tokenizer(out, "qwen2")
    config, tensors = synthetic_layout(size_gb * 1e9, family)
    assert n_vocab <= config["vocab_size"]
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # write_bpe_tokenizer's ChatML roles
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    total = sum(2 * math.prod(shape) for _, shape in tensors)
    per_shard = math.ceil(total / n_shards)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > per_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                t.normal_(1.0, 0.1, generator=generator)
            else:
                t.normal_(0.0, 0.02, generator=generator)
            part[name] = t
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def without_quantization_config(checkpoint: Path, out: Path) -> Path:
    """llama.cpp's converter refuses the quantization_config transformers leaves after a GGUF load."""
    out.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# -- the reference -------------------------------------------------------------------


def _find_reference(cache: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from convert_helpers import LLAMA_CPP_PYTHON_VERSION, reference_converter

    script = reference_converter(cache)
    if script is None:
        sys.exit(f"cannot get llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'s sdist from PyPI into {cache}")
    print(script)


def reference_script() -> Path:
    """The oracle the tests use: pytest's cache when they filled it, else the user cache dir."""
    cache = ROOT / ".pytest_cache" / "d" / "llama-cpp-python-sdist"
    if not (cache / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        from platformdirs import user_cache_dir

        cache = Path(user_cache_dir("alpaca-chat")) / "bench" / "llama-cpp-python-sdist"
        cache.mkdir(parents=True, exist_ok=True)
    return Path(in_child("--find-reference", str(cache)))


# -- the runs --------------------------------------------------------------------------


def bench_export(
    checkpoint: Path, script: Path, work: Path, rounds: int, pre_tokenizer: str | None = None
) -> tuple[Path, Path]:
    source = without_quantization_config(checkpoint, work / "view" / checkpoint.name)
    ours_out, ref_out = work / "ours.F16.gguf", work / "reference.F16.gguf"
    ours_cmd = [sys.executable, "-m", "convert.cli", "export", str(source), "--outtype", "f16", "-o", str(ours_out)]
    ref_cmd = [sys.executable, str(TESTS / "oracle_convert.py"), str(source), "--outtype", "f16", "--outfile", str(ref_out)]
    ref_env = {**os.environ, "ORACLE_SCRIPT": str(script)}
    if pre_tokenizer:
        ref_env["ORACLE_PRE_TOKENIZER"] = pre_tokenizer
    ours, ref = [], []
    for i in range(rounds):  # alternate the order: the page cache and neighbours favour neither
        pair = [(ours_cmd, ROOT, None, ours), (ref_cmd, script.parent, ref_env, ref)]
        for cmd, cwd, env, results in pair if i % 2 == 0 else reversed(pair):
            results.append(measure(cmd, cwd, env))
            print(f"  round {i + 1}: {'ours' if results is ours else 'reference':<9} "
                  f"{results[-1][0]:7.2f} s  {results[-1][1] / 1e6:6.0f} MB", flush=True)
    files = sorted(checkpoint.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    o_wall, r_wall = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in ref)
    o_rss, r_rss = statistics.median(m for _, m in ours), statistics.median(m for _, m in ref)
    print(f"export {checkpoint.name} ({size / 1e9:.2f} GB of safetensors in {len(files)} file(s)) to F16 "
          f"({ours_out.stat().st_size / 1e9:.2f} GB), median of {rounds} round(s):")
    print(f"  wall time   ours {o_wall:7.2f} s    reference {r_wall:7.2f} s    "
          f"ratio {o_wall / r_wall:.2f}  (target <= {WALL_TARGET})")
    print(f"  peak RSS    ours {o_rss / 1e6:7.0f} MB   reference {r_rss / 1e6:7.0f} MB   "
          f"ratio {o_rss / r_rss:.2f}  (target <= {RSS_TARGET})")
    print(f"  tensors     {in_child('--compare', str(ours_out), str(ref_out))}")
    return ours_out, ref_out


def _compare(ours: Path, reference: Path) -> None:
    import numpy as np
    from gguf import GGUFReader

    mine = {t.name: t for t in GGUFReader(ours).tensors}
    theirs = {t.name: t for t in GGUFReader(reference).tensors}
    differ = sorted(
        name for name in mine.keys() & theirs.keys()
        if mine[name].tensor_type != theirs[name].tensor_type
        or not np.array_equal(mine[name].data.reshape(-1).view(np.uint8), theirs[name].data.reshape(-1).view(np.uint8))
    )
    only = sorted(mine.keys() ^ theirs.keys())
    if not differ and not only:
        print(f"all {len(mine)} identical to the reference's (type and bytes)")
    else:
        print(f"{len(differ)} differ ({', '.join(differ[:3])}), {len(only)} in one file only ({', '.join(only[:3])})")


def bench_quantize(f16: Path, work: Path, rounds: int) -> None:
    gb = f16.stat().st_size / 1e9
    print(f"quantize {f16.name} ({gb * 1000:.0f} MB), median of {rounds} rounds:")
    for qtype in ("Q8_0", "Q4_K_M"):
        out = work / f"q.{qtype}.gguf"
        ours_cmd = [sys.executable, "-m", "convert.cli", "quantize", str(f16), "--type", qtype, "-o", str(out), "--no-eval"]
        bare_cmd = [sys.executable, "-c", (
            "import ctypes, sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); "
            f"p.ftype = l.LLAMA_FTYPE_MOSTLY_{qtype}; quiet = l.llama_log_callback(lambda *a: None); "
            "l.llama_log_set(quiet, None); "
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))"
        ), str(f16), str(out)]
        ours = statistics.median(measure(ours_cmd)[0] for _ in range(rounds))
        bare = statistics.median(measure(bare_cmd)[0] for _ in range(rounds))
        print(f"  {qtype:<7} ours {ours / gb:5.1f} s/GB   bare llama_model_quantize {bare / gb:5.1f} s/GB   "
              f"ratio {ours / bare:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint directory (default: SmolLM2 from the bundled GGUF)")
    parser.add_argument("--synthetic", action="store_true", help="synthesize a large sharded Qwen2-shaped checkpoint instead")
    parser.add_argument("--size-gb", type=float, default=1.1, help="size of the synthetic checkpoint (bf16), at least")
    parser.add_argument("--shards", type=int, default=4, help="number of shards of the synthetic checkpoint, at least")
    parser.add_argument("--family", choices=("qwen2", "llama"), default="qwen2", help="architecture of the synthetic checkpoint")
    parser.add_argument("--reference-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py (default: from the PyPI sdist)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build-checkpoint-into", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--synthesize-into", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--find-reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_checkpoint_into:
        _build_checkpoint(args.build_checkpoint_into)
        return 0
    if args.synthesize_into:
        _synthesize(args.synthesize_into, args.size_gb, args.shards, args.family)
        return 0
    if args.find_reference:
        _find_reference(args.find_reference)
        return 0
    if args.compare:
        _compare(*args.compare)
        return 0

    script = args.reference_script or reference_script()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        if args.synthetic:
            checkpoint = work / f"synthetic-{args.family}"
            started = time.perf_counter()
            in_child("--synthesize-into", str(checkpoint), "--size-gb", str(args.size_gb), "--shards", str(args.shards),
                     "--family", args.family)
            print(f"synthesized {checkpoint.name} in {time.perf_counter() - started:.0f} s", flush=True)
            bench_export(checkpoint, script, work, args.rounds, pre_tokenizer="qwen2")
            return 0
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = work / "SmolLM2-135M-Instruct"
            in_child("--build-checkpoint-into", str(checkpoint))
        f16, _ = bench_export(checkpoint, script, work, args.rounds)
        bench_quantize(f16, work, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
