"""alpaca-convert's exporter vs llama.cpp's own converter, and the quantizer, in one run.

    python benchmarks/bench_export.py [--checkpoint DIR] [--rounds 3] [--reference-script PATH]

Without --checkpoint, a SmolLM2-135M-Instruct bf16 checkpoint is built from
the bundled GGUF (as the tests do). llama.cpp's `convert_hf_to_gguf.py` comes
from the llama-cpp-python source distribution on PyPI (downloaded once into
the user cache dir) unless --reference-script points at one.

Prints, as medians over interleaved rounds, each export (HF -> F16 GGUF) run
in its own process:
  - wall time, ours / reference (target <= 1.0)
  - peak RSS, ours / reference (target <= 0.7)
and quantization speed (F16 -> Q8_0, Q4_K_M) in seconds per GB of input,
with our overhead over a bare `llama_model_quantize` call.
Absolute times on a shared machine are noise; only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def measure(argv: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def build_checkpoint(out: Path) -> Path:
    """Build the checkpoint in a child process: torch in this process would inflate the children's
    peak RSS (Linux carries a forked parent's high-water mark into the child's ru_maxrss)."""
    subprocess.run([sys.executable, __file__, "--build-checkpoint-into", str(out)], check=True)
    return out


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


def reference_script(cache: Path) -> Path:
    script = cache / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    LLAMA_CPP_PYTHON, "-d", str(cache)], check=True)
    sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
    prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))]
        for member in members:
            member.name = "llama.cpp/" + member.name[len(prefix):]
        tar.extractall(cache, members=members, filter="data")
    return script


def bench_export(checkpoint: Path, script: Path, work: Path, rounds: int) -> Path:
    source = without_quantization_config(checkpoint, work / "view" / checkpoint.name)
    ours_out, ref_out = work / "ours.F16.gguf", work / "reference.F16.gguf"
    ours_cmd = [sys.executable, "-m", "convert.cli", "export", str(source), "--outtype", "f16", "-o", str(ours_out)]
    ref_cmd = [sys.executable, str(script), str(source), "--outtype", "f16", "--outfile", str(ref_out)]
    ours, ref = [], []
    for i in range(rounds):  # alternate the order: the page cache and neighbours favour neither
        pair = [("ours", ours_cmd, None, ours), ("reference", ref_cmd, script.parent, ref)]
        for _, cmd, cwd, results in pair if i % 2 == 0 else reversed(pair):
            results.append(measure(cmd, cwd))
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    o_wall, r_wall = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in ref)
    o_rss, r_rss = statistics.median(m for _, m in ours), statistics.median(m for _, m in ref)
    print(f"export {checkpoint.name} ({size / 1e6:.0f} MB of safetensors) to F16, median of {rounds} rounds:")
    print(f"  wall time   ours {o_wall:6.2f} s     reference {r_wall:6.2f} s     ratio {o_wall / r_wall:.2f}  (target <= 1.0)")
    print(f"  peak RSS    ours {o_rss / 1e6:6.0f} MB    reference {r_rss / 1e6:6.0f} MB    ratio {o_rss / r_rss:.2f}  (target <= 0.7)")
    return ours_out


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
    parser.add_argument("--reference-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py (default: from the PyPI sdist)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build-checkpoint-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_checkpoint_into:
        _build_checkpoint(args.build_checkpoint_into)
        return 0

    from platformdirs import user_cache_dir

    cache = Path(user_cache_dir("alpaca-chat")) / "bench"
    script = args.reference_script or reference_script(cache / "llama-cpp-python-sdist")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint or build_checkpoint(work / "SmolLM2-135M-Instruct")
        f16 = bench_export(checkpoint, script, work, args.rounds)
        bench_quantize(f16, work, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
