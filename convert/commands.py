"""alpaca-convert's own commands: export, quantize, eval, inspect, generate and the default `convert`
(`imatrix` and what quantizing shares with it: convert/quant_commands.py).

    register(subparsers, common)   adds their parsers; each sets `run` to its handler

Each handler takes the parsed flags, calls the library and prints; it returns an
exit code and lets typed errors (AlpacaChatError) reach convert/cli.py, which
prints them as one line. The fine-tuning commands are convert/training_commands.py's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from alpaca_chat.errors import UsageError

PROG = "alpaca-convert"
DEFAULT_COMMAND = "convert"
COMMANDS = (DEFAULT_COMMAND, "export", "export-adapter", "quantize", "imatrix", "eval", "inspect", "generate")


def register(sub, common) -> None:
    from convert import adapter_commands, quant_commands

    _add_convert(sub, common)
    _add_export(sub, common)
    adapter_commands.register(sub, common)
    _add_quantize(sub, common)
    quant_commands.register(sub, common)
    _add_eval(sub, common)
    _add_inspect(sub, common)
    _add_generate(sub, common)


# -- parsers ---------------------------------------------------------------------


def _add_convert(sub, common) -> None:
    p = sub.add_parser(
        DEFAULT_COMMAND,
        parents=[common],
        help="(default) checkpoint -> F16 GGUF -> one quantized GGUF per type",
        description="Export a checkpoint to an F16 GGUF, quantize it to each type, report the quality "
        "of each against the F16, and delete the F16 unless --keep-f16.",
    )
    _checkpoint_args(p)
    p.add_argument("-q", "--quant", nargs="+", required=True, metavar="TYPE",
                   help="quantization type(s), e.g. Q4_K_M Q8_0; or auto: the smallest type whose KL divergence "
                   "against the F16 is within --max-kl (with the importance matrix)")
    p.add_argument("--max-kl", type=float, metavar="X", help="with --quant auto: the KL budget "
                   "(default 0.05, see the README)")
    p.add_argument("-o", "--output", help="output file; with several types, '{quant}' in the name is replaced "
                   "(default: ./NAME.TYPE.gguf)")
    p.add_argument("--keep-f16", action="store_true", help="keep the intermediate F16 (or --intermediate) GGUF")
    p.add_argument("--intermediate", choices=["f16", "bf16", "f32"], default="f16",
                   help="type of the intermediate GGUF (default f16)")
    _quantize_args(p)
    p.set_defaults(run=cmd_convert)


def _add_export(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help="checkpoint -> GGUF (no quantization)")
    _checkpoint_args(p)
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="tensor type (default f16)")
    p.add_argument("-o", "--output", help="output file (default: ./NAME.OUTTYPE.gguf)")
    p.set_defaults(run=cmd_export)


def _add_quantize(sub, common) -> None:
    p = sub.add_parser("quantize", parents=[common], help="GGUF -> quantized GGUF (llama.cpp's quantizer)")
    p.add_argument("input", metavar="IN.gguf", help="the GGUF to quantize (F16, BF16 or F32)")
    p.add_argument("-T", "--type", required=True, metavar="TYPE", help="quantization type, e.g. Q4_K_M")
    p.add_argument("-o", "--output", help="output file (default: IN with the type in its name)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept an already quantized input (its rounding errors add up)")
    _quantize_args(p)
    p.set_defaults(run=cmd_quantize)


def _add_eval(sub, common) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="perplexity, KL divergence and top-1 agreement against a reference",
        description="Compare MODEL with --reference on a text (built-in sample by default). "
        "With --ladder, MODEL is the reference: it is quantized to each type and each is measured.",
    )
    p.add_argument("model", metavar="MODEL.gguf", help="the quantized GGUF (with --ladder: the F16 reference)")
    p.add_argument("-r", "--reference", metavar="REF.gguf", help="the reference GGUF, usually the F16")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on (default: built-in sample)")
    p.add_argument("--ladder", metavar="T1,T2,...", help="quantize MODEL to these types and compare each")
    p.add_argument("--plot", metavar="PNG", help="with --ladder: where to write the size vs KL plot "
                   "(default: MODEL.ladder.png)")
    p.add_argument("--imatrix", metavar="FILE|auto", help="with --ladder: quantize with this importance matrix "
                   "too (auto: computed once, cached); the table and plot show each type with and without it")
    p.add_argument("--ctx", type=int, default=512, help="chunk size in tokens (default 512)")
    p.add_argument("--chunks", type=int, metavar="N", help="evaluate at most N chunks (default: the whole text)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    p.set_defaults(run=cmd_eval)


def _add_inspect(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help="show a GGUF's metadata and tensors")
    p.add_argument("file", metavar="FILE.gguf")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(run=cmd_inspect)


def _add_generate(sub, common) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="self-instruct: a local teacher model writes new Alpaca tasks from seed tasks",
        description="Stanford Alpaca's data step, offline: the teacher (any model alpaca-chat takes) is shown "
        "a few seed and generated tasks per request and writes new ones; each is kept only if it passes "
        "Stanford's filters (length, blacklist, not a seed, ROUGE-L <= 0.7 against all kept). Rerunning with "
        "a larger -n adds to OUT.json; Ctrl+C keeps every task accepted so far.",
    )
    p.add_argument("--teacher", metavar="MODEL", help="registry name, GGUF path or hub id (default: the bundled model)")
    p.add_argument("--seed-tasks", default="alpaca-seed", metavar="FILE",
                   help="Alpaca JSON/JSONL of seed tasks, or alpaca-seed (built in, the default)")
    p.add_argument("-n", type=int, required=True, metavar="N", help="rows wanted in OUT.json (counting those there)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the Alpaca JSON list to write or extend")
    p.add_argument("--parallel", type=int, default=4, metavar="K", help="requests decoded at once (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and teacher give the same rows")
    p.add_argument("--tasks-per-request", type=int, default=5, metavar="M", help="new tasks asked per request")
    p.add_argument("--max-tokens", type=int, default=768, help="token limit of one answer (default 768)")
    p.add_argument("--temperature", type=float, default=0.9, help="teacher sampling temperature (default 0.9)")
    p.add_argument("--no-grammar", dest="grammar", action="store_false",
                   help="let the teacher answer freely (by default a grammar holds it to the task format)")
    p.add_argument("--max-requests", type=int, metavar="N",
                   help="give up after N requests (default 20 per wanted task)")
    p.add_argument("--ctx", type=int, default=2048, help="context tokens per parallel request (default 2048)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    p.set_defaults(run=cmd_generate)


def _checkpoint_args(p) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a Hugging Face model directory or hub id (owner/name)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin (pickle) weights; loaded with torch.load(weights_only=True)")
    p.add_argument("--chat-template", metavar="auto|alpaca|FILE",
                   help="chat template to store: the checkpoint's own (auto, default), the Alpaca one, or a .jinja file")
    p.add_argument("--pre-tokenizer", metavar="NAME", help="llama.cpp pre-tokenizer name, if it cannot be detected")


def _quantize_args(p) -> None:
    from convert.quant_commands import quantize_flags

    quantize_flags(p)
    p.add_argument("--no-eval", action="store_true",
                   help="skip the quality line (KL divergence vs the unquantized model)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")


# -- handlers -----------------------------------------------------------------------


def cmd_export(args) -> int:
    label = args.outtype.upper()
    output = Path(args.output) if args.output else Path(f"{_checkpoint_name(args.checkpoint)}.{label}.gguf")
    _note(f"exporting {args.checkpoint} -> {output} ({label})")
    result = _export_checkpoint(args, output, args.outtype)
    print(f"wrote {result.path} ({result.architecture}, {label}, {_size(result.n_bytes)}) in {result.seconds:.1f} s")
    return 0


def cmd_quantize(args) -> int:
    from convert.quantize import parse_quant_type

    qtype = parse_quant_type(args.type)
    output = Path(args.output) if args.output else _quantized_name(Path(args.input), qtype.name)
    _note(f"quantizing {args.input} -> {output} ({qtype.name})")
    _quantize_and_report(Path(args.input), output, qtype.name, args)
    return 0


def cmd_convert(args) -> int:
    from convert.quantize import parse_quant_type

    auto = [t for t in args.quant if t.lower() == "auto"]
    if auto and len(args.quant) > 1:
        raise UsageError("--quant auto chooses one type: it cannot be combined with others")
    if args.max_kl is not None and not auto:
        raise UsageError("--max-kl goes with --quant auto")
    if auto:
        return _convert_auto(args)
    types = list(dict.fromkeys(parse_quant_type(t).name for t in args.quant))  # validate before exporting
    name = _checkpoint_name(args.checkpoint)
    outputs = _outputs(args.output, name, types)
    middle_type = args.intermediate.upper()
    keep = args.keep_f16 or middle_type in outputs
    intermediate = _intermediate_path(outputs, middle_type, name, keep)
    _note(f"converting {args.checkpoint} -> {', '.join(str(p) for p in outputs.values())}")
    try:
        result = _export_checkpoint(args, intermediate, args.intermediate)
        where = result.path if keep else "a temporary file"
        print(f"wrote {where} ({result.architecture}, {middle_type}, {_size(result.n_bytes)}) in {result.seconds:.1f} s")
        for qtype, output in outputs.items():
            if output != intermediate:
                _quantize_and_report(intermediate, output, qtype, args, reference_label=middle_type)
    finally:
        if not keep:
            intermediate.unlink(missing_ok=True)
    return 0


def _convert_auto(args) -> int:
    """convert --quant auto: export, then the smallest type within --max-kl (quant_commands.run_quant_auto)."""
    from convert.quant_auto import DEFAULT_MAX_KL
    from convert.quant_commands import run_quant_auto

    args.max_kl = DEFAULT_MAX_KL if args.max_kl is None else args.max_kl
    if not args.max_kl > 0:
        raise UsageError(f"--max-kl must be positive, not {args.max_kl}")
    name = _checkpoint_name(args.checkpoint)
    output = args.output or f"{name}.{{quant}}.gguf"
    if "{quant}" not in output:
        raise UsageError("with --quant auto, -o needs '{quant}' in the name (the type is chosen at the end)")
    middle_type = args.intermediate.upper()
    intermediate = _intermediate_path({"auto": Path(output.replace("{quant}", "auto"))}, middle_type, name,
                                      args.keep_f16)
    _note(f"converting {args.checkpoint} -> {output} (--quant auto, KL budget {args.max_kl:g})")
    try:
        result = _export_checkpoint(args, intermediate, args.intermediate)
        where = result.path if args.keep_f16 else "a temporary file"
        print(f"wrote {where} ({result.architecture}, {middle_type}, {_size(result.n_bytes)}) in {result.seconds:.1f} s")
        run_quant_auto(intermediate, output, args)
    finally:
        if not args.keep_f16:
            intermediate.unlink(missing_ok=True)
    return 0


def _export_checkpoint(args, output: Path, outtype: str):
    """Export args.checkpoint with the export flags export and convert share."""
    from convert.export import export

    return export(
        args.checkpoint,
        output,
        outtype,
        allow_pickle=args.allow_pickle,
        chat_template=_chat_template(args.chat_template),
        pre_tokenizer=args.pre_tokenizer,
        progress=_Progress("exporting"),
    )


def _intermediate_path(outputs: dict[str, Path], middle_type: str, name: str, keep: bool) -> Path:
    """Where the F16 goes: a requested output, NAME.F16.gguf if kept, else a hidden temp name
    (never an existing file of the user's, which would be deleted at the end)."""
    if middle_type in outputs:
        return outputs[middle_type]
    directory = next(iter(outputs.values())).parent
    if keep:
        return directory / f"{name}.{middle_type}.gguf"
    if not directory.is_dir():
        return directory / f"{name}.{middle_type}.gguf"  # export reports the missing directory
    try:
        fd, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".{middle_type}.gguf")
    except OSError:
        return directory / f"{name}.{middle_type}.gguf"  # export reports why it cannot write there
    os.close(fd)
    return Path(path)


def cmd_eval(args) -> int:
    from convert import evaluate

    text = _read_text(args.text)
    if args.ladder:
        return _ladder(args, text)
    if not args.reference:
        raise UsageError("eval needs --reference REF.gguf (or --ladder TYPES)")
    _note(f"comparing {args.model} with {args.reference}")
    report = evaluate.compare(
        args.model, args.reference, text, ctx=args.ctx, max_chunks=args.chunks, threads=args.threads,
        text_name=args.text,
    )
    print(evaluate.format_table([report]))
    print(f"mean KL divergence {report.kl_divergence:.6f} ± {report.kl_divergence_stderr:.6f}, "
          f"max {report.kl_divergence_max:.4f}, over {report.n_tokens} tokens")
    return 0


def cmd_inspect(args) -> int:
    from convert.inspect_gguf import describe

    print(describe(args.file, tensors=args.tensors))
    return 0


def cmd_generate(args) -> int:
    from convert import generate

    options = generate.GenerateOptions(
        teacher=args.teacher, seed_tasks=args.seed_tasks, n=args.n, output=Path(args.output),
        parallel=args.parallel, seed=args.seed, tasks_per_request=args.tasks_per_request,
        max_tokens=args.max_tokens, temperature=args.temperature, max_requests=args.max_requests,
        ctx_per_sequence=args.ctx, threads=args.threads, grammar=args.grammar,
    )
    _note(f"generating {args.output} (-n {args.n}) with {args.teacher or 'the bundled model'} as teacher")
    bar = _GenerateProgress()
    try:
        tally = generate.run(options, progress=bar, verbose=args.verbose)
    except KeyboardInterrupt:
        bar.finish()
        _note(f"interrupted; every task accepted so far is in {args.output}")
        raise
    except generate.TeacherYieldsNothing:
        bar.finish()
        raise
    bar.finish()
    if tally.requests == 0:
        print(f"{args.output} already holds {tally.had} rows (-n {args.n}): nothing to do")
        return 0
    print(tally.summary())
    print(f"wrote {args.output}: {tally.had + tally.accepted} rows ({tally.accepted} new)")
    return 0


class _GenerateProgress:
    """accepted/wanted, acceptance rate, tasks per minute and ETA on a terminal's stderr."""

    def __init__(self):
        self.live = sys.stderr.isatty()
        self.shown = False

    def __call__(self, tally) -> None:
        if not self.live:
            return
        done = tally.had + tally.accepted
        rate = tally.per_minute()
        eta = (tally.wanted - done) / rate * 60 if rate > 0 else None
        sys.stderr.write(
            f"\r\033[Kgenerate: {done}/{tally.wanted} rows  acceptance {tally.acceptance:.0%}  "
            f"{rate:.1f} tasks/min  ETA {_duration(eta)}"
        )
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# -- helpers ------------------------------------------------------------------------


def _quantize_and_report(source: Path, output: Path, qtype: str, args, reference_label: str | None = None) -> None:
    from convert.quant_commands import imatrix_spec
    from convert.quantize import quantize

    imatrix = imatrix_spec(args, source)  # auto: computed on the first type, cached for the others
    progress = _Progress(f"quantizing {qtype}")
    result = quantize(source, output, qtype, imatrix=imatrix, keep_tensors=args.keep_tensor,
                      allow_requantize=getattr(args, "allow_requantize", False), threads=args.threads,
                      progress=progress)
    gb = result.input_bytes / 1e9
    print(f"wrote {result.path} ({qtype}, {_size(result.output_bytes)}) in {result.seconds:.1f} s "
          f"({result.seconds / gb:.1f} s/GB)")
    if not args.no_eval:
        from convert.evaluate import compare

        report = compare(output, source, ctx=512, max_chunks=1, threads=args.threads)
        print(f"quality of {output.name} vs {reference_label or source.name}: {report.summary()}")


def _ladder(args, text: str | None) -> int:
    from convert import evaluate

    types = [t for t in args.ladder.replace(" ", ",").split(",") if t]
    if not types:
        raise UsageError("--ladder needs at least one type, e.g. --ladder Q8_0,Q4_K_M")
    _note(f"quantizing {args.model} to {', '.join(types)} and measuring each")
    from convert.quant_commands import imatrix_spec

    imatrix = imatrix_spec(args, Path(args.model))
    result = evaluate.ladder(
        args.model, types, text, ctx=args.ctx, max_chunks=args.chunks, imatrix=imatrix,
        without_imatrix=imatrix is not None, threads=args.threads, text_name=args.text,
        on_row=lambda row: _note(f"{row.label}{' (imatrix)' if row.imatrix else ''}: {row.report.summary()}"),
    )
    print(evaluate.format_table([row.report for row in result.rows], result.reference_size))
    plot = Path(args.plot) if args.plot else Path(args.model).with_suffix(".ladder.png")
    evaluate.plot_ladder(result, plot)
    print(f"wrote {plot}")
    return 0


class _Progress:
    """A live progress line on a terminal's stderr; silent otherwise."""

    def __init__(self, label: str):
        self.label = label
        self.live = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r\033[K{self.label}: {done}/{total} tensors  {name}{end}")
        sys.stderr.flush()


def _outputs(output: str | None, name: str, types: list[str]) -> dict[str, Path]:
    if output is None:
        return {t: Path(f"{name}.{t}.gguf") for t in types}
    if "{quant}" in output:
        return {t: Path(output.replace("{quant}", t)) for t in types}
    if len(types) == 1:
        return {types[0]: Path(output)}
    base = Path(output)
    return {t: base.with_name(f"{base.stem}.{t}{base.suffix or '.gguf'}") for t in types}


def _quantized_name(source: Path, qtype: str) -> Path:
    stem = source.stem
    for marker in (".F16", ".BF16", ".F32", "-f16", "-bf16", "-f32", ".f16", ".bf16", ".f32"):
        if stem.endswith(marker):
            stem = stem[: -len(marker)]
            break
    return source.with_name(f"{stem}.{qtype}.gguf")


def _checkpoint_name(spec: str) -> str:
    return Path(spec.rstrip("/")).name or "model"


def _chat_template(choice: str | None) -> str | None:
    if choice in (None, "auto"):
        return None
    if choice == "alpaca":
        from alpaca_chat.templates import ALPACA_JINJA

        return ALPACA_JINJA
    path = Path(choice)
    if path.suffix not in (".jinja", ".j2"):
        raise UsageError(f"--chat-template: use auto, alpaca or a .jinja file, not {choice!r}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template: cannot read {path}: {exc}") from None


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text: cannot read {path}: {exc}") from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
