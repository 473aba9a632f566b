"""`alpaca-convert prune`: flags in, `convert.prune.prune`, the result printed.

Registered by convert/training_commands.py's `register`; torch is imported only when the
command runs. Typed errors reach convert/cli.py, which prints them as one line (exit 2 for
a bad request, before any output exists).
"""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser(
        "prune",
        parents=[common],
        help="a smaller checkpoint of the same family: drop layers, FFN neurons or attention heads",
        description="Structured pruning ranked by activations on calibration text: layers by Block Influence "
        "(1 - cos of a layer's input and output), FFN neurons and attention heads by their mean activation. "
        "The output is a standard checkpoint that export converts, with pruning.json saying what went and why.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a Hugging Face model directory, hub id or GGUF")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory for the pruned checkpoint")
    p.add_argument("--drop-layers", type=int, default=0, metavar="N", help="remove the N least influential layers")
    p.add_argument("--ffn-keep", type=float, metavar="FRACTION", help="keep this fraction of each layer's FFN neurons")
    p.add_argument("--heads-keep", type=float, metavar="FRACTION",
                   help="keep this fraction of attention heads (whole KV groups when they divide, else heads within each)")
    p.add_argument("--target-params", type=_count, metavar="N",
                   help="choose what to prune to reach at most N parameters (e.g. 100M); see --prefer")
    p.add_argument("--prefer", default="width", choices=("width", "depth"),
                   help="with --target-params: prune FFN width first, or whole layers first (default width)")
    p.add_argument("--ffn-multiple", type=int, default=256, metavar="N",
                   help="FFN widths stay multiples of N (default 256: K-quant rows are 256 wide)")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="calibration text (default: a built-in text, not the evaluation text)")
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                   help="calibration tokens to score with (default 4096)")
    p.add_argument("--max-length", type=int, default=256, metavar="N", help="tokens per calibration chunk (default 256)")
    p.add_argument("--experts-keep", type=int, metavar="N",
                   help="a mixture of experts (Mixtral, Qwen3-MoE): keep each layer's N most-routed experts")
    p.set_defaults(run=cmd_prune)


def _count(text: str) -> int:
    from alpaca_chat.errors import UsageError

    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise UsageError(f"--target-params: not a number of parameters: {text!r}") from None


def cmd_prune(args) -> int:
    from convert.prune import PruneRequest, prune

    if args.experts_keep is not None:
        return _prune_experts(args)
    request = PruneRequest(
        drop_layers=args.drop_layers, ffn_keep=args.ffn_keep, heads_keep=args.heads_keep,
        target_params=args.target_params, prefer=args.prefer, ffn_multiple=args.ffn_multiple,
        calibration=args.calibration, calibration_tokens=args.calibration_tokens, max_length=args.max_length,
    )
    result = prune(args.checkpoint, args.out, request)
    shape, dropped = result.plan.shape, result.params_before - result.params_after
    print(f"pruned: {result.params_before:,} -> {result.params_after:,} parameters "
          f"(-{dropped / result.params_before:.1%}); {len(result.plan.kept_layers)} layers, FFN {shape.ffn}, "
          f"{shape.n_heads} heads / {shape.n_kv} KV heads")
    print(f"wrote {result.out} (what went and why: {result.out / 'pruning.json'})")
    return 0


def _prune_experts(args) -> int:
    from alpaca_chat.errors import UsageError
    from convert.prune_experts import prune_experts

    others = {"--drop-layers": args.drop_layers, "--ffn-keep": args.ffn_keep, "--heads-keep": args.heads_keep,
              "--target-params": args.target_params}
    given = [flag for flag, value in others.items() if value]
    if given:
        raise UsageError(f"--experts-keep prunes experts alone: give it without {', '.join(given)}")
    result = prune_experts(args.checkpoint, args.out, args.experts_keep, calibration=args.calibration,
                           calibration_tokens=args.calibration_tokens, max_length=args.max_length)
    dropped = result.params_before - result.params_after
    print(f"pruned experts: {result.params_before:,} -> {result.params_after:,} parameters "
          f"(-{dropped / result.params_before:.1%}); {args.experts_keep} experts per layer")
    print(f"wrote {result.out} (what went and why: {result.out / 'pruning.json'})")
    return 0
