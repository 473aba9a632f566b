"""`alpaca-convert imatrix`, and what `quantize`, `eval --ladder` and `convert --quant auto` share with it.

    register(subparsers, common)   adds the imatrix parser
    quantize_flags(parser)         --imatrix FILE|auto, --keep-tensor PATTERN=TYPE
    imatrix_spec(args)             the --imatrix value, "auto" resolved (computed or cached) with progress
    run_quant_auto(f16, output, args)   --quant auto: the ladder tried, and the choice

Handlers print and return an exit code; typed errors reach convert/cli.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from alpaca_chat.errors import UsageError

PROG = "alpaca-convert"


def register(sub, common) -> None:
    p = sub.add_parser(
        "imatrix",
        parents=[common],
        help="llama.cpp's importance matrix of a model, for better low-bit quantization",
        description="Run MODEL (a GGUF, or a checkpoint exported to F16 first) on a calibration text in "
        "llama.cpp and record, for every weight matrix (every expert of a MoE), the mean squared activation "
        "entering each input column: llama.cpp's imatrix GGUF, which `alpaca-convert quantize --imatrix` "
        "and llama.cpp's llama-quantize read. An interrupted run resumes where it stopped.",
    )
    p.add_argument("model", metavar="MODEL.gguf|CHECKPOINT", help="the model (best: the F16 you will quantize)")
    p.add_argument("-o", "--output", metavar="IMATRIX.gguf", help="output file (default: MODEL.imatrix.gguf)")
    p.add_argument("--text", metavar="FILE", help="calibration text (default: the built-in one, ~10,000 tokens; "
                   "never the evaluation text)")
    p.add_argument("--chunks", type=int, metavar="N", help="use at most N chunks of the text (default: all)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    p.set_defaults(run=cmd_imatrix)


def quantize_flags(p) -> None:
    p.add_argument("--imatrix", metavar="FILE|auto",
                   help="importance matrix (needed by IQ1/IQ2/IQ3_XXS and Q2_K_S, better for every type): a file "
                   "from `alpaca-convert imatrix` or llama-imatrix, or auto (computed once, cached by the model's hash)")
    p.add_argument("--keep-tensor", action="append", default=[], metavar="PATTERN=TYPE",
                   help="store tensors whose name matches the regular expression PATTERN as TYPE (e.g. "
                   "attn_v=Q8_0, token_embd=Q8_0); repeatable")


def cmd_imatrix(args) -> int:
    from convert import imatrix

    model = Path(args.model)
    if not model.exists():
        raise UsageError(f"{model} does not exist")
    if model.is_dir():  # a checkpoint is exported to F16 first
        from convert import extras

        extras.check("export")
    output = Path(args.output) if args.output else model.with_name(f"{model.name.removesuffix('.gguf')}.imatrix.gguf")
    text = None
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--text: cannot read {args.text}: {exc}") from None
    text_name = Path(args.text).name if args.text else imatrix.CALIBRATION_NAME
    _note(f"computing the importance matrix of {model} on {text_name} -> {output}")
    started = time.perf_counter()
    bar = ChunkProgress()
    try:
        made = imatrix.compute_file(model, output, text, text_name=text_name, ctx=args.ctx, chunks=args.chunks,
                                    threads=args.threads, progress=bar)
    finally:
        bar.finish()
    experts = sum(1 for counts in made.data.counts.values() if len(counts) > 1)
    print(f"wrote {output}: {len(made.data.sums)} weight matrices" + (f" ({experts} with experts)" if experts else "")
          + f", {made.chunk_count} chunks of {made.chunk_size} tokens of {text_name}, "
          f"in {time.perf_counter() - started:.1f} s")
    partial = made.partial_entries()
    if partial:
        print(f"note: {len(partial)} matrices have experts that no calibration token was routed to "
              f"(e.g. {partial[0]}); the quantizer weighs those experts evenly")
    return 0


class ChunkProgress:
    """chunks done, seconds per chunk and ETA on a terminal's stderr (a line per resume otherwise)."""

    def __init__(self, label: str = "imatrix"):
        self.label = label
        self.live = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int, seconds: float, resumed: int) -> None:
        if resumed and done == resumed and seconds == 0.0:
            _note(f"resuming at chunk {resumed}/{total}: an earlier run's sums were kept")
        if not self.live:
            return
        fresh = done - resumed
        per = seconds / fresh if fresh else None
        eta = per * (total - done) if per is not None else None
        speed = f"{per:.1f} s/chunk" if per is not None else "-- s/chunk"
        sys.stderr.write(f"\r\033[K{self.label}: {done}/{total} chunks  {speed}  ETA {_duration(eta)}")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def imatrix_spec(args, model: Path):
    """The --imatrix value for quantizing `model`: None, a file, or "auto" resolved to the cached file."""
    spec = getattr(args, "imatrix", None)
    if spec != "auto":
        return spec
    from convert.imatrix import auto_imatrix

    bar = ChunkProgress()
    try:
        return auto_imatrix(model, threads=args.threads, note=_note, progress=bar)
    finally:
        bar.finish()


def run_quant_auto(f16: Path, output: str, args) -> Path:
    """--quant auto: down the ladder with the importance matrix (auto unless --imatrix FILE), the smallest
    type within --max-kl; prints each step, the ladder tried and why it chose. Returns the file written."""
    from convert import quant_auto

    spec = getattr(args, "imatrix", None) or "auto"
    imatrix = imatrix_spec(_with(args, imatrix=spec), f16)
    _note(f"--quant auto: quantizing down {', '.join(quant_auto.LADDER)} until two types in a row exceed "
          f"KL {args.max_kl:g}")
    choice = quant_auto.choose(
        f16, output, max_kl=args.max_kl, imatrix=imatrix, keep_tensors=args.keep_tensor, threads=args.threads,
        on_step=lambda step: _note(f"{step.quant_type}: {step.size_bytes / 2**20:.1f} MiB, {step.report.summary()}"),
    )
    print(choice.table())
    print(f"wrote {choice.path} ({choice.quant_type}, {choice.chosen.size_bytes / 2**20:.1f} MiB)")
    return choice.path


def _with(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
