"""`alpaca-convert export-adapter`: a peft LoRA adapter -> a llama.cpp LoRA adapter GGUF (no torch).

    alpaca-convert export-adapter ADAPTER_DIR [--base BASE] [-o OUT.gguf] [--outtype f16]

The library is convert/export/adapter.py; this module parses, calls it and prints.
"""

from __future__ import annotations

from pathlib import Path

COMMAND = "export-adapter"


def register(sub, common) -> None:
    p = sub.add_parser(
        COMMAND,
        parents=[common],
        help="peft LoRA adapter -> llama.cpp adapter GGUF (for alpaca-chat --lora)",
        description="Write a peft LoRA adapter as llama.cpp's LoRA adapter GGUF, to apply at run time on top "
        "of the base model's GGUF (alpaca-chat BASE.gguf --lora ADAPTER.gguf) instead of merging it. "
        "Tensor names and per-family transforms are the GGUF exporter's; what llama.cpp cannot apply "
        "(DoRA, modules saved whole, a head tied to the embeddings) is refused.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="the adapter directory (adapter_config.json, "
                   "adapter_model.safetensors)")
    p.add_argument("--base", metavar="BASE",
                   help="the base model: a checkpoint directory, hub id, or the GGUF it was fine-tuned from "
                   "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type (default f16)")
    p.add_argument("-o", "--output", help="output file (default: ./ADAPTER_DIR's name.gguf)")
    p.set_defaults(run=cmd_export_adapter)


def cmd_export_adapter(args) -> int:
    from convert.commands import _note, _Progress, _size
    from convert.export import adapter  # also registers every family

    name = Path(args.adapter.rstrip("/")).name or "adapter"
    output = Path(args.output) if args.output else Path(f"{name}.gguf")
    _note(f"exporting adapter {args.adapter} -> {output} ({args.outtype.upper()})")
    result = adapter.export_adapter(
        args.adapter, output, args.outtype, base=args.base, progress=_Progress("export-adapter")
    )
    ranks = "/".join(str(r) for r in result.ranks)
    print(
        f"wrote {result.path} ({result.architecture} LoRA, {result.n_pairs} pairs, rank {ranks}, "
        f"alpha {result.alpha:g}, {args.outtype.upper()}, {_size(result.n_bytes)}) in {result.seconds:.1f} s"
    )
    from convert import gguf_base

    if gguf_base.is_gguf_spec(result.base):  # fine-tuned from a GGUF: the adapter applies to that very file
        print(f"chat with it: alpaca-chat --model {result.base} --lora {result.path}")
    else:
        print(f"chat with it: alpaca-chat --model BASE.gguf --lora {result.path}  (BASE.gguf: {result.base} "
              f"exported, e.g. alpaca-convert {result.base} --quant Q4_K_M)")
    return 0
