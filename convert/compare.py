"""`alpaca-convert compare`: what the base, the fine-tuned, the compressed and the quantized model answer.

A quick look at whether training and quantization did what was wanted: the
same held-out prompts go to each model, each rendered with the model's own
chat template (the Alpaca one for a model fine-tuned here), answered greedily,
and printed side by side with the reference answer from the data. Each model
is then scored by the mean ROUGE-L F of its answers against the references
(the `rouge-score` package), printed as a table and drawn as a bar chart.

Hugging Face checkpoints run through transformers; GGUF files through
alpaca-chat's engine, exactly as `alpaca-chat --model FILE` would run them.
`--report` adds the compression report (convert/compression_report.py).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.errors import UsageError
from alpaca_chat.templates import ALPACA_JINJA, ChatTemplate, alpaca_template
from convert import data as datamod
from convert.run_files import read_training_meta

EXPORT_TYPES = ("F16", "BF16", "F32")
REFERENCE_CHARS = 300  # the data's answer is shown shortened: it is there to compare, not to read


@dataclass(frozen=True)
class ModelSpec:
    label: str
    path: Path | str  # a checkpoint directory / hub id, or a .gguf file
    adapter: Path | None = None  # a llama.cpp LoRA adapter GGUF applied to the .gguf at run time

    @property
    def is_gguf(self) -> bool:
        return str(self.path).endswith(".gguf")


@dataclass(frozen=True)
class Prompt:
    messages: tuple[Message, ...]
    reference: str  # the answer in the data

    @property
    def title(self) -> str:
        last = self.messages[-1]
        return last.content + (f" [input: {last.input}]" if last.input else "")


@dataclass(frozen=True)
class Row:
    prompt: Prompt
    answers: tuple[str, ...]  # one per model, in order


def models_from(
    *,
    pipeline: Path | None = None,
    base: str | None = None,
    finetuned: str | None = None,
    ggufs: Sequence[Path] = (),
    lora_pairs: Sequence[tuple[Path, Path]] = (),
) -> list[ModelSpec]:
    """The models to ask: explicit ones first, else those of a pipeline directory.

    `lora_pairs` are (base GGUF, adapter GGUF): the base with the adapter applied at run time, one
    model each. A pipeline run with --adapter-gguf adds its own pair: the base quantized alone with
    NAME.lora.gguf."""
    if pipeline is not None:
        meta = read_training_meta(pipeline / "adapter")
        if meta is None:
            raise UsageError(f"{pipeline} is not a pipeline directory (no adapter/training.json)")
        base = base or meta["base_path"]
        merged = pipeline / "merged"
        finetuned = finetuned or (str(merged) if merged.is_dir() else None)
        if not ggufs:
            ggufs, found_pairs = _pipeline_ggufs(pipeline / "gguf")
            lora_pairs = [*lora_pairs, *found_pairs]
    models = []
    if base:
        models.append(ModelSpec("base", base))
    if finetuned:
        models.append(ModelSpec("fine-tuned", finetuned))
    if pipeline is not None:  # the compression steps' checkpoints (prune, distill), when the run had them
        models.extend(ModelSpec(name, pipeline / name) for name in ("pruned", "distilled")
                      if (pipeline / name / "config.json").is_file())
    models.extend(ModelSpec(_quant_label(p), p) for p in ggufs)
    for base_gguf, adapter in lora_pairs:
        for path in (base_gguf, adapter):
            if not Path(path).is_file():
                raise UsageError(f"{path} does not exist")
        models.append(ModelSpec(f"{_quant_label(Path(base_gguf))}+{_adapter_name(Path(adapter))}",
                                Path(base_gguf), Path(adapter)))
    if not models:
        raise UsageError("nothing to compare: give --pipeline DIR, or --base / --finetuned / --gguf")
    return models


def load_prompts(path: str | None, *, pipeline: Path | None = None, limit: int = 3) -> list[Prompt]:
    """Prompts from a data file, or a pipeline's held-out rows."""
    if path is None:
        if pipeline is None:
            raise UsageError("give --prompts FILE (Alpaca rows), or --pipeline DIR to use its held-out rows")
        path = str(pipeline / "adapter" / "heldout.jsonl")
    records = datamod.load_records(path)
    return [_prompt(r) for r in records[: max(limit, 1)]]


def _prompt(record: datamod.Record) -> Prompt:
    if not record.is_chat:
        return Prompt((Message("user", record.instruction, input=record.input),), record.output)
    messages = list(record.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return Prompt(tuple(Message(m["role"], m["content"]) for m in messages[:last]), messages[last]["content"])


def _pipeline_ggufs(gguf_dir: Path) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """A pipeline's quantized models, and (base alone, adapter) for each NAME.lora.gguf: the base is
    the quantized file that is not one of NAME's own (NAME.TYPE.gguf are the merged model's)."""
    files = sorted(gguf_dir.glob("*.gguf"))
    adapters = [p for p in files if p.name.endswith(".lora.gguf")]
    models = [p for p in files if p not in adapters and _quant_label(p) not in EXPORT_TYPES]
    pairs = []
    for adapter in adapters:
        name = adapter.name[: -len(".lora.gguf")]
        bases = [p for p in models if not p.name.startswith(f"{name}.")]
        if bases:
            pairs.append((bases[0], adapter))
            models = [p for p in models if p != bases[0]]
    return models, pairs


def _adapter_name(adapter: Path) -> str:
    name = adapter.name[: -len(".gguf")] if adapter.name.endswith(".gguf") else adapter.name
    return "lora" if name.endswith(".lora") else name


def compare(models: Sequence[ModelSpec], prompts: Sequence[Prompt], *, max_tokens: int = 96) -> list[Row]:
    """Greedy answers of every model to every prompt (one model in memory at a time)."""
    answers = []
    for model in models:
        if model.is_gguf:
            answers.append(_ask_gguf(model.path, prompts, max_tokens, adapter=model.adapter))
        else:
            answers.append(_ask_checkpoint(model.path, prompts, max_tokens))
    return [Row(prompt, tuple(a[i] for a in answers)) for i, prompt in enumerate(prompts)]


def _ask_checkpoint(path, prompts: Sequence[Prompt], max_tokens: int) -> list[str]:
    import torch

    from convert.model_loading import load_model, load_tokenizer, resolve_base

    base_path = resolve_base(str(path))
    tokenizer = load_tokenizer(base_path)
    model = load_model(base_path, "cpu").eval()
    template = _template_of(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
    replies = []
    for prompt in prompts:
        text = template.render(list(prompt.messages), add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=template.name == "alpaca", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        reply = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        replies.append(_cut(reply, template.stop_strings))
    return replies


def _ask_gguf(path, prompts: Sequence[Prompt], max_tokens: int, *, adapter: Path | None = None) -> list[str]:
    from alpaca_chat import gguf_check
    from alpaca_chat.engine import Engine
    from alpaca_chat.lora_spec import AdapterSpec
    from alpaca_chat.templates import resolve_template

    gguf_check.check_gguf(path)  # a bad file gets a one-line error, not a crash in llama.cpp
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, seed=0)  # as transformers' greedy
    # The engine checks the adapter against the base before llama.cpp loads it.
    adapters = (AdapterSpec(Path(adapter).resolve(), 1.0),) if adapter is not None else ()
    with Engine(path, n_ctx=2048, adapters=adapters) as engine:
        template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
        replies = []
        for prompt in prompts:
            engine.reset()
            text = template.render(list(prompt.messages))
            replies.append("".join(engine.generate(text, greedy, stop_strings=template.stop_strings)).strip())
    return replies


def _template_of(source: str | None, bos: str, eos: str) -> ChatTemplate:
    """A checkpoint's own template, as alpaca-chat would pick it from the GGUF."""
    from alpaca_chat.templates import resolve_template

    if source is None or source == ALPACA_JINJA:
        return alpaca_template(eos)
    return resolve_template("auto", source, bos, eos)


def _cut(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def _quant_label(path: Path) -> str:
    stem = Path(path).stem
    label = stem.rsplit(".", 1)[-1].upper() if "." in stem else stem
    if label == "AUTO":  # the pipeline's --quant auto: the type it chose, from the file's provenance
        try:
            from alpaca_chat.gguf_check import check_gguf

            chosen = check_gguf(path).metadata.get("general.quant_type")
        except Exception:  # noqa: BLE001 - a label only; a bad file is reported when it is loaded
            chosen = None
        return f"auto={chosen}" if chosen else label
    return label


# -- printing ------------------------------------------------------------------------------------


def format_side_by_side(rows: Sequence[Row], labels: Sequence[str], *, width: int | None = None) -> str:
    """Each prompt, then one column per model (and the reference); stacked when too narrow."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    headers = [*labels, "reference"]
    gap = " | "
    column = (width - len(gap) * (len(headers) - 1)) // len(headers)
    blocks = []
    for number, row in enumerate(rows, 1):
        texts = [*row.answers, textwrap.shorten(row.prompt.reference, width=REFERENCE_CHARS, placeholder=" ...")]
        title = textwrap.shorten(f"[{number}] {row.prompt.title}", width=max(width, 20), placeholder=" ...")
        if column < 24:
            body = "\n".join(
                f"--- {h}\n{textwrap.fill(t or '(empty)', width=max(width, 20))}" for h, t in zip(headers, texts)
            )
        else:
            cells = [[h.upper()[:column], "-" * min(column, 12)] + _wrap(t, column) for h, t in zip(headers, texts)]
            height = max(len(c) for c in cells)
            lines = [
                gap.join(c[i].ljust(column) if i < len(c) else " " * column for c in cells).rstrip()
                for i in range(height)
            ]
            body = "\n".join(lines)
        blocks.append(f"{title}\n{body}")
    return "\n\n".join(blocks)


# -- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    label: str
    rouge_l: float  # mean ROUGE-L F over the prompts
    n: int


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F of an answer against the reference (rouge-score's tokenizer, no stemming)."""
    return _scorer().score(reference, answer)["rougeL"].fmeasure


_SCORER = []


def _scorer():
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False))
    return _SCORER[0]


def scores(rows: Sequence[Row], labels: Sequence[str]) -> list[Score]:
    """Each model's mean ROUGE-L F against the references."""
    out = []
    for i, label in enumerate(labels):
        values = [rouge_l(row.prompt.reference, row.answers[i]) for row in rows]
        out.append(Score(label, sum(values) / len(values) if values else 0.0, len(values)))
    return out


def format_scores(model_scores: Sequence[Score]) -> str:
    width = max(len(s.label) for s in model_scores)
    lines = [f"{'model':<{width}}  ROUGE-L F vs reference", f"{'-' * width}  {'-' * 22}"]
    lines += [f"{s.label:<{width}}  {s.rouge_l:.4f} (mean of {s.n})" for s in model_scores]
    return "\n".join(lines)


def plot_scores(model_scores: Sequence[Score], png: Path) -> Path:
    """A bar chart of the scores, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convert.atomic import atomic_output

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(model_scores), 3.6))
    bars = ax.bar([s.label for s in model_scores], [s.rouge_l for s in model_scores], color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("ROUGE-L F vs reference")
    ax.set_ylim(0, max(0.05, max(s.rouge_l for s in model_scores) * 1.25))
    ax.set_title(f"answers on {model_scores[0].n} held-out prompts")
    fig.tight_layout()
    with atomic_output(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return png


def _wrap(text: str, width: int) -> list[str]:
    lines = []
    for paragraph in (text or "(empty)").splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, width=width) or [""])
    return lines
