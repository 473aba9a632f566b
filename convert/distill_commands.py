"""`alpaca-convert distill`: the fine-tune's flags plus the teacher's, then `convert.distill.distill`.

Registered by convert/training_commands.py's `register`. The training flags are the
fine-tune's own (generated from FinetuneConfig, same names and help); `--base` is the
student, also accepted as `--student`.
"""

from __future__ import annotations


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
