"""The compression report: size, decode speed and quality of a teacher and its compressed versions.

For each model (the teacher, a pruned or distilled checkpoint, each quantization) one row:

- parameters and file size (the checkpoint's safetensors, or the GGUF file);
- decode tokens/s through alpaca-chat's engine: the same fixed prompt and sampled generation
  for every model, rounds alternating the order, the median per model. A Hugging Face
  checkpoint is exported to an F16 GGUF for it (in a temporary directory), so the row says which
  file was timed and its tensor types (llama.cpp falls back from K-quants to 32-blocks where a
  row is not a multiple of 256 wide, which changes the speed as much as the size does);
- perplexity and mean KL(teacher || model) on held-out text (convert/eval_sample.txt by default),
  each model evaluated by llama.cpp as in `alpaca-convert eval` (convert/evaluate.py);
- ROUGE-L F of its answers on held-out prompts, when `compare` has them.

`plot` draws size against KL, the marker area following the speed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from alpaca_chat.errors import UsageError

SPEED_PROMPT = "### Instruction:\nWrite a long story about a lighthouse keeper.\n\n### Response:\n"
SPEED_TOKENS = 64  # a short generation: enough tokens for a steady rate, cheap on a CPU
SPEED_ROUNDS = 3
QUALITY_CTX = 512
QUALITY_CHUNKS = 2


@dataclass(frozen=True)
class ReportModel:
    label: str
    path: Path  # a checkpoint directory or a .gguf file

    @property
    def is_gguf(self) -> bool:
        return str(self.path).endswith(".gguf")


@dataclass
class ReportRow:
    label: str
    path: str
    params: int
    file_bytes: int
    timed: str  # the GGUF whose decode speed is reported (an F16 export for a checkpoint)
    tensor_types: str  # shares of the weights' elements by ggml type in that GGUF, e.g. "Q5_0 71% Q8_0 29%"
    tok_s: float = float("nan")
    speed_tokens: int = 0  # tokens generated per timed run (median)
    ppl: float = float("nan")
    kl: float = float("nan")
    rouge_l: float | None = None


@dataclass
class Report:
    teacher: str  # the teacher's label
    text_name: str
    n_tokens: int  # scored tokens per model
    rows: list[ReportRow] = field(default_factory=list)
    rounds: int = SPEED_ROUNDS
    speed_max_tokens: int = SPEED_TOKENS  # the longest timed reply

    def row(self, label: str) -> ReportRow:
        return next(r for r in self.rows if r.label == label)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Report:
        rows = [ReportRow(**r) for r in data.get("rows", [])]
        return cls(**{**data, "rows": rows})

    def table(self) -> list[str]:
        teacher = self.row(self.teacher)
        width = max(len(r.label) for r in self.rows)
        head = (f"{'model':<{width}} {'params':>9} {'size':>10} {'tok/s':>7} {'speed':>6} {'ppl':>9} {'KL':>8} "
                f"{'ROUGE-L':>7}  timed (tensor types)")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            speed = r.tok_s / teacher.tok_s if teacher.tok_s > 0 else float("nan")
            rouge = f"{r.rouge_l:7.3f}" if r.rouge_l is not None else f"{'-':>7}"
            lines.append(f"{r.label:<{width}} {r.params / 1e6:8.1f}M {_mib(r.file_bytes):>10} {r.tok_s:7.1f} "
                         f"{speed:5.2f}x {r.ppl:9.3f} {r.kl:8.4f} {rouge}  {r.timed} ({r.tensor_types})")
        lines.append(f"KL to {self.teacher} (nats/token) and perplexity on {self.n_tokens} tokens of {self.text_name}; "
                     f"tok/s: engine decode of a sampled reply of up to {self.speed_max_tokens} tokens, "
                     f"median of {self.rounds} alternating rounds; speed relative to the teacher")
        return lines


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- measuring ---------------------------------------------------------------------------------


def measure(
    models: Sequence[ReportModel],
    teacher: str,
    *,
    text: str | None = None,
    text_name: str | None = None,
    rouge: Mapping[str, float] | None = None,
    work: Path | None = None,
    speed_tokens: int = SPEED_TOKENS,
    rounds: int = SPEED_ROUNDS,
    ctx: int = QUALITY_CTX,
    max_chunks: int = QUALITY_CHUNKS,
    threads: int | None = None,
) -> Report:
    """Every model's row; `teacher` is the label of the model the KL is measured against."""
    from convert import evaluate

    labels = [m.label for m in models]
    if teacher not in labels:
        raise UsageError(f"the teacher {teacher!r} is not among the models ({', '.join(labels)})")
    if len(set(labels)) != len(labels):
        raise UsageError(f"two models share a label: {', '.join(labels)}")
    if speed_tokens < 8 or rounds < 1:
        raise UsageError(f"the speed run needs at least 8 tokens and 1 round (got {speed_tokens}, {rounds})")
    with tempfile.TemporaryDirectory(prefix="alpaca-report-", dir=work) as tmp:
        ggufs = {m.label: _as_gguf(m, Path(tmp)) for m in models}
        reference = ggufs[teacher]
        rows, report = [], Report(teacher, text_name or (evaluate.SAMPLE_NAME if text is None else "the given text"), 0,
                                  rounds=rounds, speed_max_tokens=speed_tokens)
        for m in models:
            quality = evaluate.compare(ggufs[m.label], reference, text, ctx=ctx, max_chunks=max_chunks,
                                       threads=threads, text_name=report.text_name)
            report.n_tokens = quality.n_tokens
            timed = Path(m.path).name if m.is_gguf else "its F16 export"
            rows.append(ReportRow(m.label, str(m.path), quality.n_params, _file_bytes(m.path), timed,
                                  tensor_types(ggufs[m.label]), ppl=quality.perplexity, kl=quality.kl_divergence,
                                  rouge_l=(rouge or {}).get(m.label)))
        speeds = decode_speed(ggufs, tokens=speed_tokens, rounds=rounds, threads=threads)
    for row in rows:
        row.tok_s, row.speed_tokens = speeds[row.label]
    report.rows = rows
    return report


def _as_gguf(model: ReportModel, tmp: Path) -> Path:
    """The model as a GGUF: itself, or its F16 export into `tmp` (the speed of a checkpoint as llama.cpp runs it)."""
    if model.is_gguf:
        return Path(model.path)
    from convert.export import export

    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model.label)
    return export(model.path, tmp / f"{safe}.F16.gguf", "f16").path


def _file_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def tensor_types(gguf: Path) -> str:
    """Shares of the matrices' elements by ggml type, largest first (1-D norms and biases left out)."""
    import gguf as gguf_py

    from alpaca_chat.gguf_parse import parse_file

    counts: dict[str, int] = {}
    for t in parse_file(gguf).tensors:
        if len(t.shape) >= 2:
            name = gguf_py.GGMLQuantizationType(t.ggml_type).name
            counts[name] = counts.get(name, 0) + t.n_elements
    total = sum(counts.values()) or 1
    return " ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def decode_speed(ggufs: Mapping[str, Path], *, tokens: int = SPEED_TOKENS, rounds: int = SPEED_ROUNDS,
                 threads: int | None = None) -> dict[str, tuple[float, int]]:
    """label -> (median decode tokens/s, median tokens generated) over `rounds` (see decode_rates)."""
    runs = decode_rates(ggufs, tokens=tokens, rounds=rounds, threads=threads)
    return {label: (statistics.median(r for r, _ in v), int(statistics.median(n for _, n in v)))
            for label, v in runs.items()}


def decode_rates(ggufs: Mapping[str, Path], *, tokens: int = SPEED_TOKENS, rounds: int = SPEED_ROUNDS,
                 threads: int | None = None) -> dict[str, list[tuple[float, int]]]:
    """label -> per round (decode tokens/s, tokens generated), through the engine.

    Every model gets the same prompt and the same sampled generation (fixed seed per round;
    sampled, since a greedy reply of a pruned model may end at once). All engines stay loaded,
    and each round visits them in the opposite order to the last, so a machine's load drifting
    during the run falls on every model alike.
    """
    from alpaca_chat.conversation import SamplingParams
    from alpaca_chat.engine import Engine, physical_cores

    engines = {}
    try:
        for label, path in ggufs.items():
            engines[label] = Engine(path, n_ctx=512, n_threads=threads or physical_cores())
        warm = SamplingParams(temperature=1.0, repeat_penalty=1.0, max_tokens=4, seed=0)
        for engine in engines.values():
            _run(engine, warm)
        runs = {label: [] for label in engines}
        for r in range(rounds):
            sampling = SamplingParams(temperature=1.0, repeat_penalty=1.0, max_tokens=tokens, seed=r)
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for label in order:
                stats = _run(engines[label], sampling)
                runs[label].append((stats.generation_tokens_per_s, stats.generated_tokens))
    finally:
        for engine in engines.values():
            engine.close()
    return runs


def _run(engine, sampling):
    engine.reset()  # no cached prefix: every run evaluates the prompt and decodes alike
    generation = engine.generate(SPEED_PROMPT, sampling)
    for _ in generation:
        pass
    return generation.stats


# -- the picture -------------------------------------------------------------------------------


def plot(report: Report, png: Path) -> Path:
    """File size against KL to the teacher; marker area follows decode speed, each point labelled."""
    from convert.atomic import atomic_output

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise UsageError("the plot needs matplotlib: pip install 'alpaca-chat[plot]'") from None
    teacher = report.row(report.teacher)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    for r in report.rows:
        ratio = r.tok_s / teacher.tok_s if teacher.tok_s > 0 else 1.0
        x, y = r.file_bytes / 2**20, max(r.kl, 0.0)
        ax.scatter([x], [y], s=80 * max(ratio, 0.1) ** 2, alpha=0.6)
        ax.annotate(f"{r.label}\n{r.tok_s:.0f} tok/s ({ratio:.2f}x)", (x, y), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"KL to {report.teacher} (nats/token)")
    ax.set_title(f"size vs KL on {report.n_tokens} held-out tokens; marker area ~ decode tokens/s", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


# -- `alpaca-convert compare --report` ------------------------------------------------------------


def add_compare_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression report (parameters, size, decode speed, KL, perplexity, ROUGE-L)")
    g.add_argument("--report", action="store_true",
                   help="also measure every model against a teacher and draw size vs KL (REPORT_PNG)")
    g.add_argument("--teacher", metavar="LABEL|MODEL",
                   help="the report's reference: a model's label (e.g. fine-tuned) or another checkpoint/GGUF "
                   "(default: the fine-tuned model, else the first)")
    g.add_argument("--report-png", metavar="PNG",
                   help="where to draw size vs KL (default: DIR/compression.png with --pipeline, else compression.png)")
    g.add_argument("--speed-tokens", type=int, default=SPEED_TOKENS, metavar="N",
                   help=f"tokens per timed reply (default {SPEED_TOKENS})")


def for_compare(args, models: Sequence, scores: Sequence) -> str:
    """The report for compare's models (compare.ModelSpec) and their ROUGE-L scores, as printed text."""
    # A base + run-time adapter is not a file of its own to size and time: the report leaves it out.
    report_models = [ReportModel(m.label, Path(m.path)) for m in models if getattr(m, "adapter", None) is None]
    teacher = resolve_teacher(report_models, getattr(args, "teacher", None))
    if teacher not in {m.label for m in report_models}:
        report_models.insert(0, ReportModel("teacher", Path(teacher)))
        teacher = "teacher"
    report = measure(report_models, teacher, rouge={s.label: s.rouge_l for s in scores},
                     speed_tokens=getattr(args, "speed_tokens", SPEED_TOKENS))
    default = Path(args.pipeline) / "compression.png" if getattr(args, "pipeline", None) else Path("compression.png")
    png = plot(report, Path(args.report_png) if getattr(args, "report_png", None) else default)
    return "\n".join(["compression report:", *report.table(), f"wrote {png}"])


def resolve_teacher(models: Sequence[ReportModel], teacher: str | None) -> str:
    """A label among `models`, or the path of another model (checked to exist)."""
    labels = [m.label for m in models]
    if teacher is None:
        return "fine-tuned" if "fine-tuned" in labels else labels[0]
    if teacher in labels:
        return teacher
    if not Path(teacher).exists():
        raise UsageError(f"--teacher {teacher}: neither a model label ({', '.join(labels)}) nor an existing path")
    return teacher


def with_rouge(report: Report, rouge: Mapping[str, float] | None) -> Report:
    rows = [replace(r, rouge_l=(rouge or {}).get(r.label, r.rouge_l)) for r in report.rows]
    return replace(report, rows=rows)
