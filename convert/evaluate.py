"""How much a quantized GGUF differs from its reference (F16), measured on text.

The measures are those of llama.cpp's `llama-perplexity --kl-divergence`:
the text is tokenized with the reference's vocabulary and cut into chunks of
`ctx` tokens (the first one replaced by BOS when the model adds one). Both
models evaluate each chunk; only the second half of a chunk is scored, so
every scored token has at least ctx/2 tokens of context. Over the scored
tokens we report:

- perplexity of each model: exp(mean negative log-likelihood of the next token);
- mean KL divergence KL(reference || model) between the next-token distributions;
- top-1 agreement: how often both models rank the same token first.

A text shorter than two chunks is scored as one chunk.

The report names the text and the number of tokens scored. A model quantized
with an importance matrix records the hash of its calibration text; scoring
it on that same text is refused, since the quantizer tuned the model to it.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from alpaca_chat import gguf_check
from alpaca_chat.errors import ConversionError

DEFAULT_CTX = 512


class EvaluationError(ConversionError):
    """The models cannot be compared (different vocabularies, text too short, llama.cpp failure)."""


SAMPLE_NAME = "the built-in evaluation text (eval_sample.txt)"


def sample_text() -> str:
    """The built-in evaluation text: English prose, Q&A, a table and a little Python."""
    return resources.files("convert").joinpath("eval_sample.txt").read_text(encoding="utf-8")


# -- llama.cpp: logits for every position ----------------------------------------


class LogitsModel:
    """A GGUF loaded in llama.cpp (through alpaca_chat's engine, the one place that builds a
    llama.cpp context), returning the logits of every position of a sequence."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = DEFAULT_CTX,
        threads: int | None = None,
        exact: bool = False,
    ):
        from alpaca_chat.engine import Engine
        from alpaca_chat.errors import EngineError

        self.path = Path(path)
        try:
            # One batch holds a whole chunk, so every position's logits come from one decode.
            self._engine = Engine(self.path, n_ctx=n_ctx, n_threads=threads or _cores(), n_batch=n_ctx, exact=exact)
        except EngineError as exc:
            raise EvaluationError(str(exc)) from None
        self.n_vocab = self._engine.n_vocab
        self.n_ctx = n_ctx

    @property
    def add_bos(self) -> bool:
        return self._engine.add_bos

    @property
    def bos(self) -> int:
        return self._engine.bos_id

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._engine.tokenize_raw(text, add_special=add_special, parse_special=parse_special)

    def logits(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """float32 [len(tokens) - start, n_vocab]: next-token logits after each prefix from `start` on."""
        from alpaca_chat.errors import EngineError

        if not 0 <= start < len(tokens) <= self.n_ctx:
            raise EvaluationError(f"cannot evaluate {len(tokens)} tokens in a {self.n_ctx}-token context")
        try:
            return self._engine.sequence_logits(list(tokens), start)
        except EngineError as exc:
            raise EvaluationError(str(exc)) from None

    def close(self) -> None:
        if getattr(self, "_engine", None) is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cores() -> int:
    from alpaca_chat.engine import physical_cores

    return physical_cores()


# -- the measures ------------------------------------------------------------------


@dataclass
class _Totals:
    n: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kld: float = 0.0
    kld_sq: float = 0.0
    kld_max: float = 0.0
    same_top: int = 0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        for start in range(0, len(targets), 64):  # bounded float64 temporaries
            stop = start + 64
            ref_lp = _log_softmax(ref_logits[start:stop])
            lp = _log_softmax(logits[start:stop])
            rows = np.arange(len(ref_lp))
            t = targets[start:stop]
            kld = np.sum(np.exp(ref_lp) * (ref_lp - lp), axis=-1).clip(min=0.0)
            self.n += len(t)
            self.nll -= float(lp[rows, t].sum())
            self.ref_nll -= float(ref_lp[rows, t].sum())
            self.kld += float(kld.sum())
            self.kld_sq += float((kld**2).sum())
            self.kld_max = max(self.kld_max, float(kld.max()))
            self.same_top += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class QualityReport:
    model: Path
    reference: Path
    n_tokens: int  # scored tokens
    perplexity: float
    reference_perplexity: float
    kl_divergence: float  # mean KL(reference || model), nats
    kl_divergence_stderr: float
    kl_divergence_max: float
    top1_agreement: float  # 0..1
    size_bytes: int
    n_params: int
    label: str = ""  # e.g. the quant type
    text_name: str = ""  # which text was scored
    imatrix: str | None = None  # the importance matrix the model was quantized with (its file name)

    @property
    def bits_per_weight(self) -> float:
        return self.size_bytes * 8 / self.n_params if self.n_params else float("nan")

    def summary(self) -> str:
        """The one-line quality report printed after a quantization."""
        return (
            f"KL divergence {self.kl_divergence:.5f}, top-1 agreement {self.top1_agreement:.1%}, "
            f"perplexity {self.perplexity:.3f} (reference {self.reference_perplexity:.3f}) "
            f"over {self.n_tokens} tokens of {self.text_name or 'text'}"
        )


def compare(
    model: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    text: str | None = None,
    *,
    ctx: int = DEFAULT_CTX,
    max_chunks: int | None = None,
    threads: int | None = None,
    label: str = "",
    text_name: str | None = None,
) -> QualityReport:
    """Perplexity, KL divergence and top-1 agreement of `model` against `reference`."""
    model, reference = Path(model), Path(reference)
    info = gguf_check.check_gguf(model)
    gguf_check.check_gguf(reference)
    text_name = text_name or (SAMPLE_NAME if text is None else "the given text")
    text = sample_text() if text is None else text
    _refuse_calibration_text(info, text, text_name)
    totals = _Totals()
    # Both models are loaded at once (memory-mapped): each chunk is compared as it is evaluated.
    with (
        LogitsModel(reference, n_ctx=ctx, threads=threads) as ref,
        LogitsModel(model, n_ctx=ctx, threads=threads) as quant,
    ):
        if ref.n_vocab != quant.n_vocab:
            raise EvaluationError(
                f"{model.name} and {reference.name} have different vocabularies ({quant.n_vocab} vs {ref.n_vocab} tokens)"
            )
        for chunk in _chunks(ref.tokenize(text), ctx, ref.bos if ref.add_bos else None, max_chunks):
            first = len(chunk) // 2 if len(chunk) > 8 else 0
            targets = np.asarray(chunk[first + 1 :])
            totals.add(ref.logits(chunk, first)[:-1], quant.logits(chunk, first)[:-1], targets)
    if totals.n == 0:
        raise EvaluationError("the evaluation text is too short (it must be at least a few tokens)")
    mean = totals.kld / totals.n
    variance = max(totals.kld_sq / totals.n - mean * mean, 0.0)
    return QualityReport(
        model=model,
        reference=reference,
        n_tokens=totals.n,
        perplexity=math.exp(totals.nll / totals.n),
        reference_perplexity=math.exp(totals.ref_nll / totals.n),
        kl_divergence=mean,
        kl_divergence_stderr=math.sqrt(variance / max(totals.n - 1, 1)),
        kl_divergence_max=totals.kld_max,
        top1_agreement=totals.same_top / totals.n,
        size_bytes=model.stat().st_size,
        n_params=info.n_params,
        label=label,
        text_name=text_name,
        imatrix=info.metadata.get("quantize.imatrix.file"),
    )


def _refuse_calibration_text(info: gguf_check.GGUFInfo, text: str, text_name: str) -> None:
    calibrated_on = info.metadata.get("quantize.imatrix.text_sha256")
    if calibrated_on and calibrated_on == hashlib.sha256(text.encode("utf-8")).hexdigest():
        raise EvaluationError(
            f"{info.path.name} was quantized with an importance matrix computed on {text_name}: "
            "its quality must be measured on other text (--text FILE)"
        )


def _chunks(tokens: list[int], ctx: int, bos: int | None, max_chunks: int | None) -> list[list[int]]:
    if len(tokens) < 2 * ctx:
        chunks = [tokens[:ctx]]
    else:
        chunks = [tokens[i : i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]
    if bos is not None:
        chunks = [[bos, *chunk[1:]] for chunk in chunks]
    return chunks[:max_chunks] if max_chunks else chunks


# -- the ladder: one reference, several quant types --------------------------------


@dataclass
class LadderRow:
    label: str
    report: QualityReport
    imatrix: bool = False


@dataclass
class Ladder:
    reference: Path
    reference_size: int
    reference_perplexity: float
    rows: list[LadderRow] = field(default_factory=list)
    imatrix: Path | None = None


def ladder(
    reference: str | os.PathLike[str],
    quant_types: Sequence[str],
    text: str | None = None,
    *,
    ctx: int = DEFAULT_CTX,
    max_chunks: int | None = None,
    imatrix: str | os.PathLike[str] | None = None,
    without_imatrix: bool = False,
    threads: int | None = None,
    text_name: str | None = None,
    on_row: Callable[[LadderRow], None] | None = None,
) -> Ladder:
    """Quantize `reference` to each type (in a temp dir, deleted after) and measure each.

    `imatrix` is a file or "auto" (computed once and cached, see convert.imatrix).
    With `without_imatrix` too, each type is also measured without it (types that
    cannot do without one are skipped there): the two curves of the plot.
    """
    from convert.quantize import parse_quant_type, quantize

    reference = Path(reference)
    gguf_check.check_gguf(reference)
    types = [parse_quant_type(t) for t in quant_types]  # fail on a typo before any work
    if imatrix is not None and str(imatrix) == "auto":
        from convert.imatrix import auto_imatrix

        imatrix = auto_imatrix(reference, threads=threads)
    if imatrix is not None:  # a bad file, or one made on the evaluation text, fails before any work
        from convert.imatrix_file import ImatrixFileError, read_imatrix

        try:
            calibrated_on = read_imatrix(imatrix).text_sha256
        except ImatrixFileError as exc:
            raise ConversionError(str(exc)) from None
        scored = sample_text() if text is None else text
        if calibrated_on == hashlib.sha256(scored.encode("utf-8")).hexdigest():
            raise EvaluationError(f"{imatrix} was computed on the evaluation text: measure on other text (--text FILE)")
    result = Ladder(reference, reference.stat().st_size, float("nan"), imatrix=Path(imatrix) if imatrix else None)
    runs = [(False, t) for t in types if not t.needs_imatrix] if without_imatrix or imatrix is None else []
    runs += [(True, t) for t in types] if imatrix is not None else []
    with tempfile.TemporaryDirectory(prefix="alpaca-ladder-", dir=reference.parent) as tmp:
        for weighted, qtype in runs:
            out = Path(tmp) / f"{reference.stem}.{qtype.name}.gguf"
            quantize(reference, out, qtype.name, imatrix=imatrix if weighted else None, threads=threads)
            report = compare(out, reference, text, ctx=ctx, max_chunks=max_chunks, threads=threads,
                             label=qtype.name, text_name=text_name)
            out.unlink()
            row = LadderRow(qtype.name, report, weighted)
            result.rows.append(row)
            result.reference_perplexity = report.reference_perplexity
            if on_row is not None:
                on_row(row)
    return result


def format_table(reports: Sequence[QualityReport], reference_size: int | None = None) -> str:
    marks = any(r.imatrix for r in reports)
    header = f"{'type':<10} {'imatrix':>7} " if marks else f"{'type':<10} "
    header += f"{'size':>10} {'bpw':>6} {'PPL':>9} {'ΔPPL':>8} {'KLD':>9} {'top-1':>7}"
    lines = [header, "-" * len(header)]
    for r in reports:
        mark = f"{'yes' if r.imatrix else 'no':>7} " if marks else ""
        lines.append(
            f"{r.label or r.model.name:<10} {mark}{_mib(r.size_bytes):>10} {r.bits_per_weight:>6.2f} "
            f"{r.perplexity:>9.3f} {r.perplexity - r.reference_perplexity:>+8.3f} "
            f"{r.kl_divergence:>9.5f} {r.top1_agreement:>7.1%}"
        )
    if reports:
        ref = reports[0]
        size = f", {_mib(reference_size)}" if reference_size else ""
        lines.append(f"reference {ref.reference.name}{size}: PPL {ref.reference_perplexity:.3f}")
        lines.append(f"measured on {ref.n_tokens} tokens of {ref.text_name or 'text'}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def plot_ladder(result: Ladder, png: str | os.PathLike[str]) -> Path:
    """Size vs KL divergence, one labelled point per quant type, as a PNG (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise ConversionError("the plot needs matplotlib (pip install 'alpaca-chat[convert]')") from None
    from convert.atomic import atomic_output

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    curves = [(False, "without an importance matrix", "#8c959f"), (True, "with the importance matrix", "#1f6feb")]
    for weighted, name, colour in curves:
        rows = sorted((r for r in result.rows if r.imatrix == weighted), key=lambda r: r.report.size_bytes)
        if not rows:
            continue
        sizes = [r.report.size_bytes / 2**20 for r in rows]
        klds = [max(r.report.kl_divergence, 1e-6) for r in rows]
        ax.plot(sizes, klds, "o-", color=colour, label=name)
        for size, kld, row in zip(sizes, klds, rows):
            ax.annotate(row.label, (size, kld), textcoords="offset points", xytext=(5, 5), fontsize=8, color=colour)
    if len({r.imatrix for r in result.rows}) > 1:
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"mean KL divergence vs {result.reference.name}")
    ax.set_title("Quantization ladder: size vs quality")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png
