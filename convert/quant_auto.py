"""`--quant auto`: the smallest quantization whose quality stays within a KL budget.

The F16 is quantized down a ladder of types, from the largest to the
smallest, each with the importance matrix (unless told otherwise), and each
result is compared with the F16 on held-out text (the built-in evaluation
text, never the calibration text): mean KL divergence of the next-token
distributions, as `alpaca-convert eval` measures it. The smallest file whose
KL is within `max_kl` is kept. KL grows as the bits shrink, but not strictly
(an IQ type with an importance matrix can beat a larger K-quant), so the walk
stops only once two types in a row are over the budget. When no type is
within it, the one with the lowest KL is kept, and the summary says so.

Every step is reported (`on_step`), and `AutoChoice.table()` is the ladder
that was tried, with the reason for the choice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert.atomic import check_writable
from convert.evaluate import DEFAULT_CTX, QualityReport, compare
from convert.quantize import parse_quant_type, quantize

# Largest to smallest (nominal bits per weight). Types that need an importance matrix are
# skipped when there is none.
LADDER: tuple[str, ...] = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XS", "IQ3_XXS",
    "Q2_K", "IQ2_M", "IQ2_XS", "IQ2_XXS",
)
# The default budget (nats of mean KL divergence against the F16): see the README's measurements.
DEFAULT_MAX_KL = 0.05
STOP_AFTER = 2  # consecutive types over the budget


@dataclass
class Step:
    quant_type: str
    report: QualityReport

    @property
    def size_bytes(self) -> int:
        return self.report.size_bytes

    @property
    def kl(self) -> float:
        return self.report.kl_divergence


@dataclass
class AutoChoice:
    max_kl: float
    imatrix: Path | None
    steps: list[Step] = field(default_factory=list)
    chosen: Step | None = None
    within_budget: bool = True
    path: Path | None = None

    @property
    def quant_type(self) -> str:
        return self.chosen.quant_type if self.chosen else ""

    def reason(self) -> str:
        step = self.chosen
        if step is None:
            return "nothing was quantized"
        if not self.within_budget:
            return (f"no type kept the KL divergence within {self.max_kl:g}; kept {step.quant_type}, "
                    f"the closest (KL {step.kl:.4f}): raise --max-kl or use a larger type")
        return (f"{step.quant_type} is the smallest file ({_mib(step.size_bytes)}) whose KL divergence "
                f"({step.kl:.4f}) is within --max-kl {self.max_kl:g}")

    def table(self) -> str:
        """The ladder tried: type, size, KL, top-1, within the budget or not; the choice marked."""
        lines = [f"{'type':<9} {'size':>10} {'KL':>8} {'top-1':>7}  within {self.max_kl:g}"]
        for step in self.steps:
            mark = "  <- chosen" if step is self.chosen else ""
            ok = "yes" if step.kl <= self.max_kl else "no"
            lines.append(f"{step.quant_type:<9} {_mib(step.size_bytes):>10} {step.kl:>8.4f} "
                         f"{step.report.top1_agreement:>7.1%}  {ok}{mark}")
        if self.steps:
            report = self.steps[0].report
            with_imatrix = f"with {self.imatrix.name}" if self.imatrix else "without an importance matrix"
            lines.append(f"quantized {with_imatrix}; measured on {report.n_tokens} tokens of {report.text_name}")
        lines.append(self.reason())
        return "\n".join(lines)


def choose(
    f16: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    max_kl: float = DEFAULT_MAX_KL,
    imatrix: str | os.PathLike[str] | None = "auto",
    ladder: Sequence[str] = LADDER,
    keep_tensors: Sequence[str] = (),
    text: str | None = None,
    text_name: str | None = None,
    ctx: int = DEFAULT_CTX,
    max_chunks: int | None = None,
    threads: int | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> AutoChoice:
    """Quantize `f16` down `ladder`, keep the smallest type within `max_kl`, write it to `output`
    ('{quant}' in the name is replaced by the type chosen); the others are deleted."""
    if not max_kl > 0:
        from alpaca_chat.errors import UsageError

        raise UsageError(f"--max-kl must be a positive KL divergence, not {max_kl}")
    f16 = Path(f16)
    types = [parse_quant_type(t) for t in ladder]  # fail on a typo before any work
    if imatrix is not None and str(imatrix) == "auto":
        from convert.imatrix import auto_imatrix

        imatrix = auto_imatrix(f16, threads=threads)
    types = [t for t in types if imatrix is not None or not t.needs_imatrix]
    result = AutoChoice(max_kl, Path(imatrix) if imatrix is not None else None)
    output = str(output)
    directory = Path(output.replace("{quant}", "X")).parent
    check_writable(Path(output.replace("{quant}", "Q8_0")))
    with tempfile.TemporaryDirectory(prefix=".alpaca-quant-auto-", dir=directory) as tmp:
        over = 0
        for qtype in types:
            path = Path(tmp) / f"{qtype.name}.gguf"
            quantize(f16, path, qtype.name, imatrix=imatrix, keep_tensors=keep_tensors, threads=threads)
            report = compare(path, f16, text, ctx=ctx, max_chunks=max_chunks, threads=threads,
                             label=qtype.name, text_name=text_name)
            step = Step(qtype.name, report)
            result.steps.append(step)
            if on_step is not None:
                on_step(step)
            best = result.chosen
            if step.kl <= max_kl and (best is None or step.size_bytes < best.size_bytes):
                if best is not None:
                    (Path(tmp) / f"{best.quant_type}.gguf").unlink()
                result.chosen = step  # only the best file so far is kept
            else:
                path.unlink()
            over = over + 1 if step.kl > max_kl else 0
            if over >= STOP_AFTER:
                break
        if result.chosen is None:  # none within the budget: the closest, quantized again
            result.within_budget = False
            result.chosen = min(result.steps, key=lambda s: s.kl)
            quantize(f16, Path(tmp) / f"{result.chosen.quant_type}.gguf", result.chosen.quant_type,
                     imatrix=imatrix, keep_tensors=keep_tensors, threads=threads)
        final = Path(output.replace("{quant}", result.chosen.quant_type))
        os.replace(Path(tmp) / f"{result.chosen.quant_type}.gguf", final)  # same directory: atomic
        result.path = final
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
