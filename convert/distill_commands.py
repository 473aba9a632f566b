"""`alpaca-convert distill`: the fine-tune's flags plus the teacher's, then `convert.distill.distill`.

Registered by convert/training_commands.py's `register`. The training flags are the
fine-tune's own (generated from FinetuneConfig, same names and help); `--base` is the
student, also accepted as `--student`.
"""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    from convert import training_commands

    p = sub.add_parser(
        "distill",
        parents=[common],
        help="train a student on a teacher's logits (knowledge distillation), e.g. after prune",
        description="Logit distillation: KL between the teacher's and the student's next-token distributions at "
        "temperature T (scaled by T^2), optionally mixed with cross-entropy (--alpha). The teacher is a Hugging "
        "Face checkpoint or a GGUF (run by alpaca-chat's engine); its top-k logits are cached in OUT, so epochs "
        "and --resume never rerun it. Data: Alpaca rows, a .txt file, or 'teacher-samples N'.",
    )
    p.add_argument("--teacher", required=True, metavar="MODEL", help="the teacher: HF directory, hub id or GGUF")
    p.add_argument("--student", dest="base", metavar="DIR|ID", help="the student (same as --base)")
    training_commands.add_config_flags(p)
    for action in p._actions:  # --base is given as --student too; --data takes 'teacher-samples N'
        if action.dest == "base":
            action.required = False
        if action.dest == "data":
            action.nargs = "+"
        if action.dest == "out":  # -o OUT, as prune and export
            action.option_strings.append("-o")
            p._option_string_actions["-o"] = action
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (default 2)")
    p.add_argument("--alpha", type=float, default=0.0, help="share of plain cross-entropy in the loss (default 0)")
    p.add_argument("--top-k", type=int, default=32, help="teacher logits kept per position (default 32)")
    p.add_argument("--full", action="store_true", help="train every weight of the student, not a LoRA adapter")
    p.add_argument("--teacher-ctx", type=int, default=1024, help="a GGUF teacher's context (default 1024)")
    p.set_defaults(run=cmd_distill)
    if "pipeline" in sub.choices:
        add_pipeline_flags(sub.choices["pipeline"])


def cmd_distill(args) -> int:
    from alpaca_chat.errors import UsageError
    from convert import training_commands
    from convert.distill import TEACHER_SAMPLES, DistillSettings, distill

    if not args.base:
        raise UsageError("distill needs a student: --student DIR (or --base)")
    samples = 0
    if args.data[0] == TEACHER_SAMPLES:
        if len(args.data) != 2 or not args.data[1].isdigit() or int(args.data[1]) < 1:
            raise UsageError("--data teacher-samples N: N is how many samples the teacher writes, e.g. 200")
        samples = int(args.data[1])
    elif len(args.data) != 1:
        raise UsageError(f"--data takes one file (or 'teacher-samples N'), not {len(args.data)} values")
    args.data = args.data[0]
    config = training_commands.config_from_args(args)
    settings = DistillSettings(teacher=args.teacher, temperature=args.temperature, alpha=args.alpha,
                               top_k=args.top_k, full=args.full, teacher_samples=samples, teacher_ctx=args.teacher_ctx)
    metrics = distill(config, settings)
    losses = metrics["eval_loss"] or metrics["train_loss"]
    last = f", last loss {losses[-1]['loss']:.4f}" if losses else ""
    print(f"distilled {metrics['steps']} steps in {metrics['seconds']:.0f} s{last}; wrote {config.out}")
    return 0


# -- the pipeline's compression steps (convert/distill_pipeline.py) --------------------------------


def add_pipeline_flags(p) -> None:
    """--prune-*, --distill and --distill-from on `alpaca-convert pipeline`."""
    from convert import prune_commands

    g = p.add_argument_group("compression (prune the fine-tuned model, then distill it; see alpaca-convert prune)")
    g.add_argument("--prune-drop-layers", type=int, default=0, metavar="N", help="prune: remove the N least influential layers")
    g.add_argument("--prune-ffn-keep", type=float, metavar="FRACTION", help="prune: keep this fraction of FFN neurons")
    g.add_argument("--prune-heads-keep", type=float, metavar="FRACTION", help="prune: keep this fraction of attention heads")
    g.add_argument("--prune-target-params", type=prune_commands._count, metavar="N",
                   help="prune: choose what to remove to reach at most N parameters (see --prune-prefer)")
    g.add_argument("--prune-prefer", default="width", choices=("width", "depth"), help="with --prune-target-params")
    g.add_argument("--prune-ffn-multiple", type=int, default=256, metavar="N", help="prune: FFN widths stay multiples of N")
    g.add_argument("--prune-calibration", type=Path, metavar="FILE", help="prune: calibration text (default built in)")
    g.add_argument("--distill", action="store_true",
                   help="after --prune-*: train every weight of the pruned model on the fine-tuned model's logits")
    g.add_argument("--distill-steps", type=int, metavar="N", help="--distill's steps (default --max-steps)")
    g.add_argument("--distill-learning-rate", type=float, default=5e-4, metavar="LR",
                   help="--distill's peak learning rate (default 5e-4: the whole student trains)")
    g.add_argument("--distill-from", metavar="TEACHER",
                   help="train the fine-tune (LoRA) on TEACHER's logits instead of plain cross-entropy "
                   "(HF directory, hub id or GGUF; same vocabulary)")
    g.add_argument("--distill-temperature", type=float, default=2.0, metavar="T", help="distillation temperature")
    g.add_argument("--distill-alpha", type=float, default=0.0, help="share of plain cross-entropy in the loss")
    g.add_argument("--distill-top-k", type=int, default=32, metavar="K", help="teacher logits kept per position")
    p.set_defaults(run=cmd_pipeline)


def compress_options(args):
    """CompressOptions from the flags, or None when no compression flag is given."""
    from convert.distill_pipeline import CompressOptions
    from convert.prune import PruneRequest

    request = PruneRequest(
        drop_layers=args.prune_drop_layers, ffn_keep=args.prune_ffn_keep, heads_keep=args.prune_heads_keep,
        target_params=args.prune_target_params, prefer=args.prune_prefer, ffn_multiple=args.prune_ffn_multiple,
        calibration=args.prune_calibration,
    )
    pruning = request != PruneRequest(prefer=args.prune_prefer, ffn_multiple=args.prune_ffn_multiple)
    if not (pruning or args.distill or args.distill_from):
        return None
    return CompressOptions(
        prune=request if pruning else None, distill=args.distill, distill_from=args.distill_from,
        temperature=args.distill_temperature, alpha=args.distill_alpha, top_k=args.distill_top_k,
        distill_steps=args.distill_steps, distill_learning_rate=args.distill_learning_rate,
    )


def cmd_pipeline(args) -> int:
    """training_commands.cmd_pipeline with the compression options (until that builds them itself)."""
    import sys

    from convert import training_commands
    from convert.pipeline import PipelineOptions, run_pipeline

    compress = compress_options(args)
    if compress is None:
        return training_commands.cmd_pipeline(args)
    training_commands.quiet_libraries(args.verbose)
    generate = training_commands._generate_options(args)  # first: it sets args.data
    extra = {k: getattr(args, k) for k in ("imatrix", "max_kl") if k in PipelineOptions.__dataclass_fields__}
    options = PipelineOptions(
        finetune=training_commands.config_from_args(args),
        quants=tuple(dict.fromkeys(q.upper() for q in args.quant)),
        merge_dtype=args.merge_dtype,
        evaluate=not args.no_eval,
        generate=generate,
        compress=compress,
        **extra,
    )
    summary = run_pipeline(options, report=lambda line: print(line, file=sys.stderr, flush=True))
    print(summary.format())
    return 0
