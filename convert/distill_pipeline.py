"""The pipeline's compression steps: prune, distill, and --distill-from (convert/pipeline.py builds them).

    ... -> merge -> prune (DIR/pruned) -> distill (DIR/distilled) -> export -> quantize -> eval

`--prune-*` prunes the fine-tuned (merged) model; `--distill` then trains every weight of the
pruned model on the fine-tuned model's logits (the teacher), on the fine-tune's data. Export
takes the last of merged, pruned, distilled. `--distill-from TEACHER` replaces finetune + merge
by one LoRA distillation of the base on TEACHER's logits, merged into DIR/merged.

Each step reports, in its manifest and the summary, the model's parameters and its perplexity
and KL to the teacher on the held-out text (convert/eval_sample.txt, which neither the pruning
calibration text nor the built-in training data contains).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from alpaca_chat.errors import UsageError

HELD_OUT = Path(__file__).with_name("eval_sample.txt")


@dataclass(frozen=True)
class CompressOptions:
    prune: object | None = None  # a convert.prune.PruneRequest: prune the fine-tuned model
    distill: bool = False  # train the pruned model on the fine-tuned model's logits
    distill_from: str | None = None  # the fine-tune learns this teacher's logits instead of plain CE
    temperature: float = 2.0
    alpha: float = 0.0
    top_k: int = 32
    distill_steps: int | None = None  # --distill: default the fine-tune's --max-steps
    distill_learning_rate: float = 5e-4  # --distill trains every weight of the pruned model

    def check(self, base: str | None = None) -> None:
        """Every refusal before any work (with `base`: the prune request against its shape)."""
        if self.distill and self.prune is None:
            raise UsageError("--distill trains the pruned model: give a --prune-* flag too "
                             "(--distill-from TEACHER distills the fine-tune itself)")
        if self.distill_steps is not None and self.distill_steps < 1:
            raise UsageError(f"--distill-steps must be at least 1, not {self.distill_steps}")
        if self.distill_learning_rate <= 0:
            raise UsageError(f"--distill-learning-rate must be above 0, not {self.distill_learning_rate}")
        self.settings(teacher="-").check()
        if self.prune is not None and base is not None:
            from convert import model_loading, prune

            config = model_loading.load_model_config(model_loading.resolve_base(str(base)))
            prune.check_request(self.prune, config, prune.family_of(config))

    def settings(self, teacher: str, *, full: bool = False):
        from convert.distill import DistillSettings

        return DistillSettings(teacher=teacher, temperature=self.temperature, alpha=self.alpha, top_k=self.top_k,
                               full=full)


def source_for_export(out: Path, compress: CompressOptions | None) -> Path:
    if compress is not None and compress.distill:
        return out / "distilled"
    if compress is not None and compress.prune is not None:
        return out / "pruned"
    return out / "merged"


def training_metrics(out: Path, compress: CompressOptions | None) -> Path:
    """The fine-tune's metrics file: adapter/metrics.json, or merged/distill.json with --distill-from."""
    from convert import run_files
    from convert.distill import DISTILL_FILE

    if compress is not None and compress.distill_from:
        return out / "merged" / DISTILL_FILE
    return out / "adapter" / run_files.METRICS_FILE


# -- steps ------------------------------------------------------------------------------


def distill_finetune_step(options, base: Path, data_inputs: dict):
    """--distill-from: the base learns TEACHER's logits through LoRA (the fine-tune's settings), merged into DIR/merged."""
    from convert.pipeline import Step, _input

    compress = options.compress
    config = options.finetune
    settings = {k: v for k, v in config.run_settings().items() if k not in ("base", "data", "val_data")}
    settings["distill"] = _distill_settings(compress)
    return Step(
        "distill-finetune",
        {"base": base, "teacher": _input(compress.distill_from), **data_inputs},
        settings,
        (options.merged_dir,),
        lambda resume: _run_distill(replace(config, out=options.merged_dir), compress.settings(compress.distill_from),
                                    resume, teacher=None),
    )


def compression_steps(options) -> list:
    from convert.pipeline import Step, _input

    compress = options.compress
    if compress is None or compress.prune is None:
        return []
    request = compress.prune
    prune_settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()}
    inputs = {"model": options.merged_dir}
    if request.calibration is not None:
        inputs["calibration"] = Path(request.calibration)
    pruned, distilled = options.out / "pruned", options.out / "distilled"
    steps = [Step("prune", inputs, prune_settings, (pruned,), lambda resume: _run_prune(options.merged_dir, pruned, request))]
    if compress.distill:
        config = options.finetune
        trained = replace(config, base=str(pruned), out=distilled, max_steps=compress.distill_steps or config.max_steps,
                          learning_rate=compress.distill_learning_rate)
        settings = {k: v for k, v in trained.run_settings().items() if k not in ("base", "data", "val_data")}
        settings["distill"] = _distill_settings(compress, full=True)
        steps.append(Step(
            "distill",
            {"student": pruned, "teacher": options.merged_dir, "data": _input(config.data)},
            settings,
            (distilled,),
            lambda resume: _run_distill(trained, compress.settings(str(options.merged_dir), full=True), resume,
                                        teacher=options.merged_dir),
        ))
    return steps


def _distill_settings(compress: CompressOptions, full: bool = False) -> dict:
    return {"temperature": compress.temperature, "alpha": compress.alpha, "top_k": compress.top_k, "full": full}


def _run_prune(model: Path, out: Path, request) -> dict:
    from convert.prune import prune

    result = prune(model, out, request)
    shape = result.plan.shape
    return {"params_before": result.params_before, "params_after": result.params_after,
            "layers": len(result.plan.kept_layers), "ffn": shape.ffn, "heads": shape.n_heads, "kv_heads": shape.n_kv,
            "held_out": held_out_quality(out, model)}


def _run_distill(config, settings, resume: bool, *, teacher: Path | None) -> dict:
    from convert.distill import CACHE_DIR, distill
    from convert.trainer import CHECKPOINTS_DIR

    out = Path(config.out)
    can_resume = resume and any((out / CHECKPOINTS_DIR).glob("checkpoint-*"))
    if not can_resume and out.exists():  # other inputs or settings: start over, keeping the teacher cache
        for entry in out.iterdir():
            if entry.name != CACHE_DIR:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    metrics = distill(replace(config, resume=can_resume), settings)
    losses = metrics["eval_loss"] or metrics["train_loss"]
    info = {"steps": metrics["steps"], "resumed_from": metrics["resumed_from"],
            "last_loss": losses[-1]["loss"] if losses else None, "teacher_examples_run": metrics["teacher_examples_run"]}
    if teacher is not None:
        info["held_out"] = held_out_quality(out, teacher)
    return info


# -- the compression report ---------------------------------------------------------------


def held_out_quality(model: Path, teacher: Path, text_file: Path = HELD_OUT, max_tokens: int = 2048) -> dict:
    """Parameters, file size, perplexity and mean KL(teacher || model) on held-out text (float32, one sequence)."""
    models = {"teacher": teacher, "model": model}
    quality = measure_quality(models, teacher, text_file.read_text(encoding="utf-8"), max_tokens=max_tokens)
    return {"params": count_params(model), "teacher_params": count_params(teacher),
            "bytes": sum(f.stat().st_size for f in Path(model).glob("*.safetensors")),
            "ppl": quality["model"][0], "kl": quality["model"][1], "teacher_ppl": quality["teacher"][0],
            "text": text_file.name}


def measure_quality(models: dict, teacher: Path, text: str, *, max_tokens: int = 2048) -> dict:
    """name -> (perplexity, mean KL(teacher || model)) on `text`, float32, one sequence."""
    import torch

    from convert import model_loading

    tokenizer = model_loading.load_tokenizer(Path(teacher))
    ids = torch.tensor([tokenizer(text)["input_ids"][:max_tokens]])

    def log_probs(path):
        model = model_loading.load_model(Path(path), "cpu", dtype=torch.float32)
        with torch.no_grad():
            return model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)

    reference = log_probs(teacher)
    targets = ids[0, 1:]
    out = {}
    for name, path in models.items():
        lp = reference if Path(path) == Path(teacher) else log_probs(path)
        ppl = float(torch.exp(-lp.gather(-1, targets[:, None]).mean()))
        kl = float((reference.exp() * (reference - lp)).sum(-1).mean())
        out[name] = (ppl, kl)
    return out


def count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for name in f.keys():
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= int(d)
                total += n
    return total


def compression_report_info(options, rouge: dict | None = None, **measure_options) -> dict:
    """The eval step's compression report: teacher, pruned, distilled and each quantization, measured
    alike (convert/compression_report.py), drawn into DIR/compression.png; {} without compression steps."""
    from convert import compare, compression_report

    compress = options.compress
    if compress is None:
        return {}
    specs = compare.models_from(pipeline=options.out, ggufs=[options.quantized(q) for q in options.quants])
    models = [compression_report.ReportModel(m.label, Path(m.path)) for m in specs if m.label != "base"]
    teacher = "fine-tuned"
    if compress.distill_from:  # the fine-tune is the student here; its teacher is the given model
        models.insert(0, compression_report.ReportModel("teacher", Path(compress.distill_from)))
        teacher = "teacher"
    report = compression_report.measure(models, teacher, rouge=rouge, **measure_options)
    png = compression_report.plot(report, options.out / "compression.png")
    return {"compression": report.to_dict(), "compression_png": str(png)}


def summary_lines(steps) -> list[str]:
    """The compression report's lines for the pipeline summary (empty without compression steps):
    the eval step's full report when it ran, else the prune and distill steps' held-out figures."""
    evaluation = next((s for s in steps if s.name == "eval"), None)
    measured = (evaluation.info or {}).get("compression") if evaluation is not None else None
    if measured:
        from convert.compression_report import Report

        report = Report.from_dict(measured)
        return ["compression report:", *(f"  {line}" for line in report.table()),
                f"  size vs KL: {evaluation.info.get('compression_png')}"]
    rows = []
    for name in ("prune", "distill"):
        step = next((s for s in steps if s.name == name), None)
        q = (step.info or {}).get("held_out") if step is not None else None
        if q:
            rows.append((name + ("d" if name == "prune" else "ed"), q))
    if not rows:
        return []
    first = rows[0][1]
    lines = [f"compression (held-out {first['text']}; KL to the fine-tuned model, nats/token):",
             f"  {'fine-tuned':<11} {first['teacher_params'] / 1e6:8.1f} M params   ppl {first['teacher_ppl']:8.2f}"]
    for label, q in rows:
        fewer = 1 - q["params"] / q["teacher_params"]
        lines.append(f"  {label:<11} {q['params'] / 1e6:8.1f} M params ({-fewer:+.1%})   ppl {q['ppl']:8.2f}   "
                     f"KL {q['kl']:.4f}")
    return lines
