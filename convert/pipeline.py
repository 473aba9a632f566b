"""[generate ->] finetune -> merge -> export -> quantize -> eval, as one resumable command.

    run_pipeline(PipelineOptions(finetune=FinetuneConfig(..., out=DIR), quants=("Q4_K_M",)))

Every step writes its artifact under DIR and a manifest in DIR/manifests/STEP.json:
its inputs with their sha256, its settings, its outputs with their sha256,
and whether it finished (convert/pipeline_steps.py). Running the pipeline again
skips a step whose inputs, settings and outputs are unchanged, redoes one whose
inputs changed (and so everything after it), and resumes a fine-tune that was
interrupted from its last checkpoint.

    DIR/data/generated.json       teacher-written Alpaca rows (generate, with --generate N)
    DIR/adapter/                  the LoRA adapter, metrics.json, loss.png (finetune)
    DIR/merged/                   the merged checkpoint (merge; with --distill-from: distill-finetune)
    DIR/pruned/, DIR/distilled/   with --prune-* [--distill]: the compressed model (convert/distill_pipeline.py)
    DIR/gguf/NAME.F16.gguf        the unquantized GGUF (export)
    DIR/gguf/NAME.Q4_K_M.gguf     one per quantization type (quantize)
    DIR/gguf/BASE.Q4_K_M.gguf     with --adapter-gguf: the base alone (export base, quantize base; BASE.F16.gguf too)
    DIR/gguf/NAME.lora.gguf       with --adapter-gguf: the adapter for llama.cpp (alpaca-chat BASE.gguf --lora ...)
    DIR/eval.json                 eval losses, quantization quality, ROUGE-L of every model's answers (eval)
    DIR/compare.png               the ROUGE-L bar chart (eval)
    DIR/summary.txt               what the last run printed

Export, quantization and the quality measure are the converter's
(`convert.export`, `convert.quantize`, `convert.evaluate`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from alpaca_chat.errors import UsageError
from convert import run_files
from convert.atomic import atomic_output
from convert.finetune_config import FinetuneConfig
from convert.generate import GenerateOptions
from convert.pipeline_steps import HASH_CACHE, MANIFESTS, Hasher, Step, StepOutcome, run_step
from convert.pipeline_steps import input_source as _input  # also distill_pipeline's
from convert.pipeline_steps import write_json as _write_json

AUTO = "AUTO"  # in quants: the smallest type within the KL budget (convert.quant_auto), written as NAME.AUTO.gguf


@dataclass(frozen=True)
class PipelineOptions:
    finetune: FinetuneConfig  # its `out` is the pipeline's directory
    quants: tuple[str, ...] = ("Q4_K_M",)
    merge_dtype: str = "auto"
    evaluate: bool = True
    export_type: str = "f16"
    generate: GenerateOptions | None = None  # self-instruct the data first; its output is the fine-tune's data
    imatrix: str | None = None  # importance matrix for the quantizer: a file, or "auto" (computed once, cached)
    max_kl: float | None = None  # quants "AUTO": the KL budget (default quant_auto.DEFAULT_MAX_KL)
    compress: object | None = None  # convert.distill_pipeline.CompressOptions: prune, distill, --distill-from
    adapter_gguf: bool = False  # also the adapter as a llama.cpp LoRA GGUF, with the base quantized alone

    @property
    def out(self) -> Path:
        return Path(self.finetune.out)

    @staticmethod
    def generated_data(out: Path) -> Path:
        return Path(out) / "data" / "generated.json"

    @property
    def base_name(self) -> str:
        base = Path(str(self.finetune.base).rstrip("/"))
        return base.stem if base.suffix == ".gguf" else base.name

    @property
    def name(self) -> str:
        return f"{Path(str(self.finetune.base).rstrip('/')).name}-alpaca"

    @property
    def adapter_dir(self) -> Path:
        return self.out / "adapter"

    @property
    def merged_dir(self) -> Path:
        return self.out / "merged"

    @property
    def exported(self) -> Path:
        return self.out / "gguf" / f"{self.name}.{self.export_type.upper()}.gguf"

    def quantized(self, qtype: str) -> Path:
        return self.out / "gguf" / f"{self.name}.{qtype}.gguf"

    # With adapter_gguf: the base exported and quantized as it is, and the adapter beside it.
    @property
    def base_exported(self) -> Path:
        return self.out / "gguf" / f"{self.base_name}.{self.export_type.upper()}.gguf"

    @property
    def base_quant(self) -> str:
        """The base's quantization: the first type asked for (Q4_K_M if that is only auto)."""
        return next((q for q in self.quants if q != AUTO), "Q4_K_M")

    @property
    def base_quantized(self) -> Path:
        return self.out / "gguf" / f"{self.base_name}.{self.base_quant}.gguf"

    @property
    def adapter_gguf_file(self) -> Path:
        return self.out / "gguf" / f"{self.name}.lora.gguf"

    @property
    def eval_file(self) -> Path:
        return self.out / "eval.json"


@dataclass
class Summary:
    options: PipelineOptions
    steps: list[StepOutcome]

    def step(self, name: str) -> StepOutcome | None:
        return next((s for s in self.steps if s.name == name), None)

    @property
    def chat_model(self) -> Path:
        return self.options.quantized(self.options.quants[0])

    @property
    def chat_command(self) -> str:
        return f"alpaca-chat --model {self.chat_model.resolve()}"

    @property
    def lora_command(self) -> str | None:
        """The base with the adapter applied at run time (with adapter_gguf)."""
        o = self.options
        if not o.adapter_gguf:
            return None
        return f"alpaca-chat --model {o.base_quantized.resolve()} --lora {o.adapter_gguf_file.resolve()}"

    def format(self) -> str:
        lines = [f"pipeline in {self.options.out}:"]
        width = max([18, *(len(s.name) for s in self.steps)])
        for s in self.steps:
            lines.append(f"  {s.name:<{width}} {'up to date, skipped' if s.skipped else f'done in {s.seconds:.1f} s'}")
        generated = self.step("generate")
        if generated is not None and generated.info:
            g = generated.info
            lines.append(f"data: {g['rows']} teacher-written rows in {self.options.generate.output}"
                         + (f" ({g['accepted']} new of {g['candidates']} candidates)" if g.get("candidates") else ""))
        lines.append("files:")
        for path in self._files():
            lines.append(f"  {_size(path):>10}  {path}")
        trained = getattr(self.step("finetune"), "info", {})  # none with --distill-from
        if trained.get("base_eval_loss") is not None:
            lines.append(
                f"eval loss on {trained['val_rows']} held-out rows: {trained['base_eval_loss']:.4f} (base) -> "
                f"{trained['final_eval_loss']:.4f} (fine-tuned)"
            )
        auto = self.step(f"quantize {AUTO}")
        if auto is not None and auto.info.get("chosen"):
            lines.append(f"--quant auto chose {auto.info['chosen']} for {self.options.quantized(AUTO).name}; the ladder:")
            lines.extend(f"  {line}" for line in auto.info.get("ladder", []))
        from convert.distill_pipeline import summary_lines

        lines.extend(summary_lines(self.steps))
        evaluation = self.step("eval")
        lines.extend(evaluation.info.get("quality", []) if evaluation else [])
        lines.append("chat with it:")
        lines.append(f"  {self.chat_command}")
        if self.lora_command:
            lines.append("or with the base and the adapter applied at run time (other fine-tunes share the base):")
            lines.append(f"  {self.lora_command}")
        return "\n".join(lines)

    def _files(self) -> list[Path]:
        o = self.options
        files = [o.adapter_dir / "adapter_model.safetensors", *sorted(o.merged_dir.glob("*.safetensors")),
                 *(f for d in ("pruned", "distilled") for f in sorted((o.out / d).glob("*.safetensors"))), o.exported]
        files += [o.quantized(q) for q in o.quants]
        if o.adapter_gguf:
            files += [o.base_exported, o.base_quantized, o.adapter_gguf_file]
        return [p for p in files if p.exists()]


# -- running -----------------------------------------------------------------------------


def run_pipeline(options: PipelineOptions, *, report: Callable[[str], None] = lambda line: None) -> Summary:
    from convert.model_loading import resolve_base
    from convert.quantize import parse_quant_type

    for qtype in options.quants:
        if qtype != AUTO:
            parse_quant_type(qtype)  # an unknown type fails now, not after the fine-tune
    if options.compress is not None:
        options.compress.check(options.finetune.base)  # bad --prune-*/--distill flags: now, not after training
        if options.adapter_gguf and options.compress.distill_from:
            raise UsageError("--adapter-gguf needs the fine-tune's LoRA adapter; --distill-from trains none")
    options.out.mkdir(parents=True, exist_ok=True)
    hasher = Hasher(options.out / MANIFESTS / HASH_CACHE)
    base = resolve_base(options.finetune.base)
    outcomes = []
    for step in build_steps(options, base):
        outcomes.append(run_step(step, options.out, hasher, report))
        hasher.save()
    summary = Summary(options, outcomes)
    text = summary.format()
    with atomic_output(options.out / "summary.txt") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return summary


def build_steps(options: PipelineOptions, base: Path) -> list[Step]:
    from convert import distill_pipeline as dp

    config = options.finetune
    adapter = options.adapter_dir
    adapter_files = [adapter / name for name in (*run_files.ADAPTER_FILES, run_files.TRAINING_FILE)]
    data_inputs = {"data": _input(config.data)}
    if config.val_data:
        data_inputs["val_data"] = _input(config.val_data)
    steps = []
    if options.generate is not None:
        steps.append(_generate_step(options.generate))
        data_inputs["data"] = options.generate.output  # hashed once it exists, not taken for a hub id
    trained = [
        Step(
            "finetune",
            {"base": base, **data_inputs},
            {k: v for k, v in config.run_settings().items() if k not in ("base", "data", "val_data")},
            (*adapter_files, adapter / run_files.METRICS_FILE),
            lambda resume: _finetune(options, resume),
        ),
        Step(
            "merge",
            {"base": base, **{f"adapter/{p.name}": p for p in adapter_files}},
            {"dtype": options.merge_dtype},
            (options.merged_dir,),
            lambda resume: _merge(options, base),
        ),
    ]
    distill_from = options.compress is not None and options.compress.distill_from
    steps += [dp.distill_finetune_step(options, base, data_inputs)] if distill_from else trained
    steps += dp.compression_steps(options)
    steps += [
        Step(
            "export",
            {"merged": dp.source_for_export(options.out, options.compress)},
            {"outtype": options.export_type},
            (options.exported,),
            lambda resume: _export(options),
        ),
    ]
    for qtype in options.quants:
        steps.append(
            Step(
                f"quantize {qtype}",
                {"source": options.exported},
                _quantize_settings(options, qtype),
                (options.quantized(qtype),),
                lambda resume, qtype=qtype: _quantize(options, qtype),
            )
        )
    if options.adapter_gguf:
        steps += _adapter_steps(options, base, adapter_files)
    if options.evaluate:
        steps.append(
            Step(
                "eval",
                {"metrics": dp.training_metrics(options.out, options.compress), "reference": options.exported}
                | {qtype: options.quantized(qtype) for qtype in options.quants},
                {"quants": list(options.quants)},
                (options.eval_file,),
                lambda resume: _evaluate(options),
            )
        )
    return steps


# -- the steps ---------------------------------------------------------------------------------


def _generate_step(gen: GenerateOptions) -> Step:
    """Self-instruct as a step: it reruns when the seeds, the teacher or a setting changed; the
    output file is appended to (a larger N adds rows; delete DIR/data to start over)."""
    from convert.data import resolve_data_name

    teacher = gen.teacher or "bundled model"
    settings = {k: getattr(gen, k) for k in ("n", "seed", "parallel", "tasks_per_request", "max_tokens", "temperature")}
    return Step(
        "generate",
        {"seed_tasks": _input(str(resolve_data_name(gen.seed_tasks))), "teacher": _input(teacher)},
        settings,
        (gen.output,),
        lambda resume: _generate(gen),
    )


def _generate(gen: GenerateOptions) -> dict:
    from convert import generate

    gen.output.parent.mkdir(parents=True, exist_ok=True)
    tally = generate.run(gen)
    return {"rows": tally.had + tally.accepted, "accepted": tally.accepted, "candidates": tally.candidates,
            "requests": tally.requests, "rejected": dict(tally.rejected)}


def _finetune(options: PipelineOptions, resume: bool) -> dict:
    from convert import finetune

    adapter = options.adapter_dir
    can_resume = resume and any((adapter / run_files.CHECKPOINTS_DIR).glob("checkpoint-*"))
    if not can_resume and adapter.exists():
        shutil.rmtree(adapter)  # a run with other inputs: start over
    result = finetune.finetune(replace(options.finetune, out=adapter, resume=can_resume))
    m = result.metrics
    return {
        "base_eval_loss": m.get("base_eval_loss"),
        "final_eval_loss": m.get("final_eval_loss"),
        "val_rows": m["data"]["val_examples"],
        "tokens_per_second": m.get("tokens_per_second"),
        "steps": m.get("steps"),
        # The base was a quantized GGUF (dequantized once): which one, in the manifest too.
        "base_gguf": (run_files.read_training_meta(options.adapter_dir) or {}).get("base_gguf"),
    }


def _merge(options: PipelineOptions, base: Path) -> dict:
    from convert.merge import merge

    result = merge(str(base), options.adapter_dir, options.merged_dir, dtype=options.merge_dtype)
    return {"max_logit_difference": result.max_logit_difference, "dtype": result.dtype, "template": result.template}


def _export(options: PipelineOptions) -> dict:
    from convert.distill_pipeline import source_for_export
    from convert.export import export

    options.exported.parent.mkdir(parents=True, exist_ok=True)
    source = source_for_export(options.out, options.compress)
    result = export(source, options.exported, options.export_type)
    return {"architecture": result.architecture, "bytes": result.n_bytes}


def _adapter_steps(options: PipelineOptions, base: Path, adapter_files: list[Path]) -> list[Step]:
    """The base exported and quantized as it is, and the adapter as a llama.cpp LoRA GGUF (f16) for it."""
    qtype = options.base_quant
    return [
        Step("export base", {"base": base}, {"outtype": options.export_type}, (options.base_exported,),
             lambda resume: _export_base(options, base)),
        Step(f"quantize base {qtype}", {"source": options.base_exported}, _quantize_settings(options, qtype),
             (options.base_quantized,), lambda resume: _quantize_base(options)),
        Step("export adapter", {"base": base, **{f"adapter/{p.name}": p for p in adapter_files}}, {"outtype": "f16"},
             (options.adapter_gguf_file,), lambda resume: _export_adapter(options, base)),
    ]


def _export_base(options: PipelineOptions, base: Path) -> dict:
    from convert.export import export

    options.base_exported.parent.mkdir(parents=True, exist_ok=True)
    result = export(base, options.base_exported, options.export_type)
    return {"architecture": result.architecture, "bytes": result.n_bytes}


def _quantize_base(options: PipelineOptions) -> dict:
    from convert.quantize import quantize

    result = quantize(options.base_exported, options.base_quantized, options.base_quant, imatrix=options.imatrix)
    return {"bytes": result.output_bytes}


def _export_adapter(options: PipelineOptions, base: Path) -> dict:
    from convert.export.adapter import export_adapter

    result = export_adapter(options.adapter_dir, options.adapter_gguf_file, "f16", base=str(base))
    return {"bytes": result.n_bytes, "pairs": result.n_pairs, "ranks": list(result.ranks), "alpha": result.alpha}


def _quantize_settings(options: PipelineOptions, qtype: str) -> dict:
    settings = {"type": qtype}  # only what is set: a manifest written before these options stays valid
    if options.imatrix or qtype == AUTO:
        settings["imatrix"] = options.imatrix or "auto"
    if qtype == AUTO:
        from convert.quant_auto import DEFAULT_MAX_KL

        settings["max_kl"] = options.max_kl or DEFAULT_MAX_KL
    return settings


def _quantize(options: PipelineOptions, qtype: str) -> dict:
    from convert.quantize import quantize

    if qtype == AUTO:
        from convert import quant_auto

        settings = _quantize_settings(options, qtype)
        choice = quant_auto.choose(options.exported, options.quantized(qtype), max_kl=settings["max_kl"],
                                   imatrix=settings["imatrix"])
        return {"bytes": choice.chosen.size_bytes, "chosen": choice.quant_type, "kl": choice.chosen.kl,
                "ladder": choice.table().splitlines()}
    result = quantize(options.exported, options.quantized(qtype), qtype, imatrix=options.imatrix)
    return {"bytes": result.output_bytes}


def _evaluate(options: PipelineOptions) -> dict:
    from convert.evaluate import compare

    from convert.distill_pipeline import training_metrics

    metrics = json.loads(training_metrics(options.out, options.compress).read_text(encoding="utf-8"))
    quality = []
    for qtype in options.quants:
        report = compare(options.quantized(qtype), options.exported, ctx=512, max_chunks=1)
        quality.append(f"quality of {qtype} vs {options.export_type.upper()}: {report.summary()}")
    info = {
        "eval_loss": {
            "rows": metrics.get("data", {}).get("val_examples"),
            "base": metrics.get("base_eval_loss"),
            "finetuned": metrics.get("final_eval_loss"),
        },
        "quality": quality,
    }
    scored = _answer_scores(options)
    info["quality"] += scored.pop("quality", [])
    info.update(scored)
    from convert.distill_pipeline import compression_report_info

    info.update(compression_report_info(options, info.get("rouge_l")))  # {} without --prune-*/--distill*
    _write_json(options.eval_file, info)
    return info


ROUGE_PROMPTS = 8  # held-out rows answered by every model for the ROUGE-L line
ROUGE_MAX_TOKENS = 64  # enough to score an answer; the eval step stays a small part of a run


def _answer_scores(options: PipelineOptions) -> dict:
    """ROUGE-L F of base, fine-tuned and each GGUF's greedy answers on the held-out rows, and the chart."""
    from convert import compare

    heldout = options.adapter_dir / run_files.HELDOUT_FILE
    if not heldout.is_file() or not heldout.read_text(encoding="utf-8").strip():
        return {}
    models = compare.models_from(pipeline=options.out, ggufs=[options.quantized(q) for q in options.quants])
    prompts = compare.load_prompts(str(heldout), limit=ROUGE_PROMPTS)
    rows = compare.compare(models, prompts, max_tokens=ROUGE_MAX_TOKENS)
    scores = compare.scores(rows, [m.label for m in models])
    compare.plot_scores(scores, options.out / "compare.png")
    line = ", ".join(f"{s.label} {s.rouge_l:.3f}" for s in scores)
    return {
        "rouge_l": {s.label: s.rouge_l for s in scores},
        "quality": [f"ROUGE-L F vs reference on {len(prompts)} held-out rows: {line}"],
    }


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
