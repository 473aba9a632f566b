"""`alpaca-convert finetune | merge | pipeline | compare`: flags in, library call, printed result.

`convert/cli.py` calls `register(subparsers)`; each handler returns an exit
code and lets typed errors (AlpacaChatError) reach cli.py, which prints them
as one line. The finetune flags are generated from `FinetuneConfig`, so the
help text lives in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from alpaca_chat.errors import UsageError


def register(subparsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the libraries' logs")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    _add_finetune(subparsers, common)
    _add_merge(subparsers, common)
    _add_pipeline(subparsers, common)
    _add_compare(subparsers, common)
    from convert import distill_commands, prune_commands  # compression: their own modules

    prune_commands.register(subparsers, common)
    distill_commands.register(subparsers, common)


# -- parsers ---------------------------------------------------------------------------


def _add_finetune(sub, common) -> None:
    p = sub.add_parser(
        "finetune",
        parents=[common],
        help="LoRA fine-tune a Hugging Face model on Alpaca (or chat) data",
        description="Train a LoRA adapter with the Stanford Alpaca prompt. Several GPUs or nodes: "
        "accelerate launch -m convert.cli finetune ...",
    )
    add_config_flags(p)
    p.set_defaults(run=cmd_finetune)


def _add_merge(sub, common) -> None:
    p = sub.add_parser(
        "merge",
        parents=[common],
        help="merge a LoRA adapter into its base (safetensors), checking the logits",
        description="Merge an adapter into its base model and save a checkpoint ready for export, "
        "with the chat template it was trained with.",
    )
    p.add_argument("--base", required=True, help="the base model the adapter was trained on (directory or hub id)")
    p.add_argument("--adapter", required=True, help="the adapter directory (from finetune)")
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: the base's)")
    p.add_argument("--tolerance", type=float, default=None, help="allowed logit difference, relative (default 1e-3)")
    p.set_defaults(run=cmd_merge)


def _add_pipeline(sub, common) -> None:
    p = sub.add_parser(
        "pipeline",
        parents=[common],
        help="finetune -> merge -> export -> quantize -> eval, skipping steps already done",
        description="The whole recipe, from data to a GGUF alpaca-chat can open. Each step records its inputs; "
        "running it again redoes only what changed and resumes an interrupted fine-tune.",
    )
    add_config_flags(p, skip=("resume",))  # the pipeline resumes an interrupted fine-tune by itself
    _optional(p, "data")  # --generate makes the data
    p.add_argument(
        "-q", "--quant", nargs="+", default=["Q4_K_M"], metavar="TYPE",
        help="quantization type(s) (default Q4_K_M); auto: the smallest type within --max-kl, as NAME.AUTO.gguf",
    )
    p.add_argument("--max-kl", type=float, metavar="X", help="with --quant auto: the KL budget (default 0.05)")
    p.add_argument("--imatrix", metavar="FILE|auto", help="importance matrix for the quantizer (auto: computed "
                   "once on the F16, cached; --quant auto uses auto unless given a file)")
    p.add_argument("--generate", type=int, metavar="N",
                   help="first write N Alpaca rows with a teacher model (self-instruct) and train on them")
    p.add_argument("--teacher", metavar="MODEL", help="with --generate: the teacher (default: the bundled model)")
    p.add_argument("--seed-tasks", default="alpaca-seed", metavar="FILE",
                   help="with --generate: seed tasks (default alpaca-seed, built in)")
    p.add_argument("--parallel", type=int, default=4, metavar="K", help="with --generate: requests decoded at once")
    p.add_argument("--merge-dtype", default="auto", help="dtype of the merged checkpoint (default: the base's)")
    p.add_argument("--no-eval", action="store_true", help="skip measuring the quantized GGUFs against the F16")
    p.add_argument("--adapter-gguf", action="store_true",
                   help="also write the adapter as a llama.cpp LoRA GGUF and the base quantized alone, to chat "
                   "with base + adapter (alpaca-chat BASE.gguf --lora ADAPTER.gguf)")
    p.set_defaults(run=cmd_pipeline)


def _add_compare(sub, common) -> None:
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="answers of the base, the fine-tuned and the quantized model, side by side",
        description="Greedy answers to held-out prompts from each model, side by side. Give --pipeline DIR, "
        "or the models one by one.",
    )
    p.add_argument("--pipeline", metavar="DIR", help="a pipeline output directory: takes every model from it")
    p.add_argument("--base", help="the base model (directory or hub id)")
    p.add_argument("--finetuned", metavar="DIR", help="the merged checkpoint (from merge)")
    p.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="quantized GGUF file(s)")
    p.add_argument("--gguf-lora", nargs=2, action="append", default=[], metavar=("BASE", "ADAPTER"),
                   help="a base GGUF with a LoRA adapter GGUF applied at run time, as one more model (repeatable; "
                   "--pipeline adds a run's --adapter-gguf pair by itself)")
    p.add_argument("--prompts", metavar="FILE", help="Alpaca JSON/JSONL rows to ask (default: the held-out rows)")
    p.add_argument("-n", "--limit", type=int, default=3, help="how many prompts (default 3)")
    p.add_argument("--max-tokens", type=int, default=96, help="longest answer in tokens (default 96)")
    p.add_argument("--width", type=int, default=None, help="output width in columns (default: the terminal's)")
    p.add_argument("--plot", metavar="PNG", help="where to write the ROUGE-L bar chart "
                   "(default: DIR/compare.png with --pipeline, else compare.png)")
    from convert import compression_report

    compression_report.add_compare_flags(p)  # --report, --teacher, --report-png, --speed-tokens
    p.set_defaults(run=cmd_compare)


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per FinetuneConfig field, with its help text and type."""
    from convert.finetune_config import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _unwrap_optional(hints[f.name])
        required = f.default is dataclasses.MISSING
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="+", metavar="NAME", help=help_text)
        else:
            default = None if required else f.default
            shown = "" if required or default is None else f" (default {default})"
            parser.add_argument(
                flag,
                type=kind,
                required=required,
                default=default,
                metavar=f.metadata.get("metavar"),
                help=help_text + shown,
            )


def _unwrap_optional(kind):
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return options[0]
    return kind


def config_from_args(args):
    from convert.finetune_config import FinetuneConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig) if hasattr(args, f.name)}
    if values["target_modules"]:
        values["target_modules"] = tuple(values["target_modules"])
    if values["max_steps"] is not None and values["max_steps"] < 1:
        raise UsageError("--max-steps must be at least 1")
    for name in ("batch_size", "grad_accum", "save_steps", "max_length"):
        if values[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("learning_rate", "epochs"):
        if not values[name] > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be above 0")
    return FinetuneConfig(**values)


# -- handlers ----------------------------------------------------------------------------


def quiet_libraries(verbose: bool) -> None:
    """transformers' and datasets' progress bars and deprecation notes are noise here, unless --verbose."""
    if verbose:
        return
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\b")


def cmd_finetune(args) -> int:
    from convert.finetune import finetune

    quiet_libraries(args.verbose)
    config = config_from_args(args)
    result = finetune(config)
    print(f"wrote the adapter, metrics.json and loss.png to {result.out}")
    print(_loss_line(result.metrics))
    print(f"next: alpaca-convert merge --base {config.base} --adapter {result.out} --out {result.out}-merged")
    return 0


def cmd_merge(args) -> int:
    from convert.merge import DEFAULT_TOLERANCE, merge

    quiet_libraries(args.verbose)
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    result = merge(args.base, args.adapter, args.out, dtype=args.dtype, tolerance=tolerance)
    print(
        f"merged {args.adapter} into {args.base}: {result.out} ({result.dtype}, chat template: {result.template}) "
        f"in {result.seconds:.1f} s"
    )
    print(
        f"logits check: merged vs base+adapter differ by at most {result.max_logit_difference:.2e} "
        f"(the adapter moves them by up to {result.adapter_effect:.3f})"
    )
    return 0


def cmd_pipeline(args) -> int:
    from convert.pipeline import PipelineOptions, run_pipeline

    quiet_libraries(args.verbose)
    generate = _generate_options(args)
    options = PipelineOptions(
        finetune=config_from_args(args),
        quants=tuple(dict.fromkeys(q.upper() for q in args.quant)),
        merge_dtype=args.merge_dtype,
        evaluate=not args.no_eval,
        generate=generate,
        imatrix=args.imatrix,
        max_kl=args.max_kl,
        adapter_gguf=args.adapter_gguf,
    )
    summary = run_pipeline(options, report=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary.format())
    return 0


def _generate_options(args):
    """The pipeline's self-instruct step from --generate/--teacher/--seed-tasks; sets args.data to its output."""
    from convert.generate import GenerateOptions
    from convert.pipeline import PipelineOptions

    if args.generate is None:
        if args.data is None:
            raise UsageError("pipeline needs --data DATA, or --generate N to have a teacher write it")
        return None
    if args.data is not None:
        raise UsageError("--data and --generate both name the training data; give one")
    output = PipelineOptions.generated_data(Path(args.out))
    args.data = str(output)
    return GenerateOptions(
        teacher=args.teacher, seed_tasks=args.seed_tasks, n=args.generate, output=output,
        parallel=args.parallel, seed=args.seed,
    ).checked()


def _optional(parser: argparse.ArgumentParser, dest: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.required = False


def cmd_compare(args) -> int:
    from convert import compare

    quiet_libraries(args.verbose)
    models = compare.models_from(
        pipeline=Path(args.pipeline) if args.pipeline else None,
        base=args.base,
        finetuned=args.finetuned,
        ggufs=[Path(g) for g in args.gguf],
        lora_pairs=[(Path(base), Path(adapter)) for base, adapter in args.gguf_lora],
    )
    prompts = compare.load_prompts(args.prompts, pipeline=Path(args.pipeline) if args.pipeline else None, limit=args.limit)
    rows = compare.compare(models, prompts, max_tokens=args.max_tokens)
    labels = [m.label for m in models]
    print(compare.format_side_by_side(rows, labels, width=args.width))
    model_scores = compare.scores(rows, labels)
    print()
    print(compare.format_scores(model_scores))
    plot = Path(args.plot) if args.plot else (Path(args.pipeline) if args.pipeline else Path(".")) / "compare.png"
    print(f"wrote {compare.plot_scores(model_scores, plot)}")
    if args.report:
        from convert import compression_report

        print()
        print(compression_report.for_compare(args, models, model_scores))
    return 0


def _loss_line(metrics: dict) -> str:
    before, after = metrics.get("base_eval_loss"), metrics.get("final_eval_loss")
    speed = metrics.get("tokens_per_second") or 0.0
    timing = f"{metrics['steps']} steps in {metrics['train_seconds']:.0f} s, {speed:.0f} tokens/s"
    if before is not None and after is not None:
        return f"eval loss on {metrics['data']['val_examples']} held-out rows: {before:.4f} (base) -> {after:.4f}; {timing}"
    return timing
