"""Self-instruct: Stanford Alpaca's data step, with a local teacher model.

The method of Stanford's `generate_instruction.py`, adapted to chat models:
each request shows the teacher a few seed tasks and a few it already wrote,
numbered, and asks for more in the same format; the answer is parsed, and a
task is kept only if it passes every filter (length, punctuation, blacklist,
not a seed, an output, and ROUGE-L F <= 0.7 against everything kept so far).

The teacher runs through `alpaca_chat`'s engine (llama.cpp, the model's own
chat template), several requests at once as parallel sequences: no torch. A
GBNF grammar holds each reply to the task format (`GenerateOptions.grammar`).
Only `run()` touches the engine; everything else is a pure function or a
small class, tested on its own. The output file is rewritten atomically after
every accepted batch, so Ctrl+C keeps every task accepted so far, and a rerun
with a larger -n keeps the rows already there byte for byte.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_chat.errors import ConversionError, DataError, UsageError
from convert.atomic import atomic_output, check_writable

# Stanford's blacklist: tasks a text-only model cannot do (or that need a file it has not got).
BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)
_BLACKLIST_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)
MIN_WORDS, MAX_WORDS = 3, 150  # Stanford's instruction length bounds (more than 3, at most 150 words)
MAX_SIMILARITY = 0.7  # ROUGE-L F against any kept instruction
REJECTIONS = ("unparsed", "truncated", "length", "punctuation", "blacklist", "seed copy", "empty output", "too similar")

REQUIREMENTS = """You are asked to come up with a set of diverse task instructions for an AI assistant, each with an input and the assistant's answer.

Requirements:
1. Do not repeat the verb of an instruction; use diverse language: questions and imperative sentences.
2. Make the tasks diverse: open-ended generation, classification, editing, rewriting, math, coding, advice, explanation, brainstorming...
3. The assistant must be able to do the task in text: no images, audio, files, or actions in the world.
4. Write in English. Each instruction is 1 to 2 sentences.
5. Give an input when the task needs one (a specific example, under 100 words); otherwise write <noinput>.
6. The output is a good answer to the instruction and input, under 100 words.

Write each task in exactly this format:
N. Instruction: ...
N. Input: ...
N. Output: ...
###"""


@dataclass(frozen=True)
class Task:
    instruction: str
    input: str
    output: str

    def to_row(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


# -- the request -------------------------------------------------------------------------


def build_request(examples: Sequence[Task], n_new: int) -> tuple[str, str]:
    """(user message, start of the reply): numbered examples, then ask for `n_new` more.

    The reply is started for the teacher ("N. Instruction:"), which keeps small
    models in the format; the parser sees it in front of the generated text.
    """
    shown = "\n".join(_format_task(i, task) for i, task in enumerate(examples, 1))
    first = len(examples) + 1
    message = (
        f"{REQUIREMENTS}\n\nHere are {len(examples)} examples:\n\n{shown}\n"
        f"Now write {n_new} new, different tasks, numbered {first} to {first + n_new - 1}, in the same format."
    )
    return message, f"{first}. Instruction:"


def _format_task(number: int, task: Task) -> str:
    return (
        f"{number}. Instruction: {task.instruction}\n"
        f"{number}. Input: {task.input or '<noinput>'}\n"
        f"{number}. Output: {task.output}\n###"
    )


# -- parsing the answer ------------------------------------------------------------------

_FIELD = re.compile(
    r"^[ \t>*#-]*(?:\d+\s*[.):]\s*)?\**(instruction|input|output)\**\s*[:：]", re.IGNORECASE | re.MULTILINE
)
_NO_INPUT = {"<noinput>", "noinput", "<no input>", "no input", "none", "n/a", "na", "-", "(none)", "empty", ""}


def parse_tasks(text: str, *, truncated: bool = False) -> tuple[list[Task], int]:
    """The tasks in a teacher's answer, and how many were dropped as cut off.

    Tolerates numbered or unnumbered fields, bold markers, chatter before,
    between and after the tasks, and a missing input. With `truncated` (the
    answer hit the token limit) the last task is dropped: its output may be
    cut mid-sentence (Stanford does the same).
    """
    marks = list(_FIELD.finditer(text))
    tasks: list[dict[str, str]] = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        name = mark.group(1).lower()
        value = _clean_value(text[mark.end() : end])
        if name == "instruction" or not tasks or name in tasks[-1]:
            tasks.append({})
        tasks[-1][name] = value
    parsed = [
        Task(t.get("instruction", ""), _normal_input(t.get("input", "")), t.get("output", ""))
        for t in tasks
        if t.get("instruction")
    ]
    if truncated and parsed:
        return parsed[:-1], 1
    return parsed, 0


def _clean_value(raw: str) -> str:
    """A field's text: up to a ### separator or a blank line followed by chatter, stripped."""
    value = raw.split("###", 1)[0]
    return value.strip().strip("*").strip()


def _normal_input(value: str) -> str:
    return "" if value.strip().strip(".").lower() in _NO_INPUT else value


# -- filters -------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def rejection(task: Task, seeds: set[str]) -> str | None:
    """Why a parsed task is rejected by the cheap filters (None: it passes them)."""
    words = task.instruction.split()
    if not MIN_WORDS < len(words) <= MAX_WORDS:
        return "length"
    if not task.instruction[0].isalnum():
        return "punctuation"
    if _BLACKLIST_RE.search(task.instruction):
        return "blacklist"
    if normalize(task.instruction) in seeds:
        return "seed copy"
    if not task.output.strip():
        return "empty output"
    return None


class RougeIndex:
    """ROUGE-L F of a new instruction against every kept one, fast as the set grows.

    Scores use rouge-score (Stanford's package and tokenizer). F = 2·LCS/(a+b),
    and the LCS is at most the tokens the two share, so most pairs are ruled out
    by a token-count bound before any LCS is computed.
    """

    def __init__(self, threshold: float = MAX_SIMILARITY):
        from rouge_score import rouge_scorer, tokenizers

        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._tokenize = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize
        self._texts: list[str] = []
        self._counts: list[Counter] = []
        self._lengths: list[int] = []
        self._postings: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        tokens = self._tokenize(text)
        index = len(self._texts)
        self._texts.append(text)
        self._counts.append(Counter(tokens))
        self._lengths.append(len(tokens))
        for token in set(tokens):
            self._postings.setdefault(token, []).append(index)

    def too_similar(self, text: str) -> bool:
        tokens = self._tokenize(text)
        if not tokens:
            return False
        counts = Counter(tokens)
        for index in self._candidates(counts):
            shared = sum((counts & self._counts[index]).values())
            if 2 * shared / (len(tokens) + self._lengths[index]) <= self.threshold:
                continue  # even an LCS of every shared token stays under the threshold
            if self._scorer.score(self._texts[index], text)["rougeL"].fmeasure > self.threshold:
                return True
        return False

    def _candidates(self, counts: Counter) -> set[int]:
        found: set[int] = set()
        for token in counts:
            found.update(self._postings.get(token, ()))
        return found


# -- the output file -------------------------------------------------------------------------


class OutputFile:
    """OUT.json: a JSON list of Alpaca rows, appended to by atomic rewrites.

    Rows already in the file keep their bytes: new rows are spliced in before
    the closing bracket, and the file is replaced only once written whole.
    """

    def __init__(self, path: Path):
        self.path = path
        self.text, self.rows = self._read(path)

    @staticmethod
    def _read(path: Path) -> tuple[str, list[dict]]:
        if not path.exists():
            check_writable(path)
            return "", []
        try:
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not a JSON list of Alpaca rows (invalid JSON at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} is not a JSON list of Alpaca rows; give another -o, or move it away")
        for number, row in enumerate(rows, 1):
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("instruction", "output"))):
                raise DataError(f"{path}: row {number} is not an Alpaca row (instruction, input, output)")
        check_writable(path)
        return text, rows

    def append(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            return
        new_rows = [task.to_row() for task in tasks]
        body = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in new_rows)
        if self.rows:
            head = self.text[: self.text.rindex("]")].rstrip()
            text = f"{head},\n{body}\n]\n"
        else:
            text = f"[\n{body}\n]\n"
        with atomic_output(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        self.text = text
        self.rows.extend(new_rows)


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateOptions:
    teacher: str | None  # anything `alpaca-chat --model` takes (None: the bundled model)
    seed_tasks: str  # a file, or a built-in name such as alpaca-seed
    n: int  # rows wanted in the output, counting those already there
    output: Path
    parallel: int = 4
    seed: int = 0
    tasks_per_request: int = 5
    seed_examples: int = 3  # seed tasks shown per request
    generated_examples: int = 2  # already-generated tasks shown per request
    temperature: float = 0.9
    top_p: float = 0.95
    max_tokens: int = 768
    ctx_per_sequence: int = 2048
    max_requests: int | None = None  # default: 20 per wanted task
    threads: int | None = None
    grammar: bool = True  # the teacher's reply constrained to the task format (a GBNF grammar)

    def checked(self) -> GenerateOptions:
        if self.n < 1:
            raise UsageError("-n must be at least 1")
        for name in ("parallel", "tasks_per_request", "max_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_requests is not None and self.max_requests < 1:
            raise UsageError("--max-requests must be at least 1")
        return self


@dataclass
class Tally:
    """What a run did: requests, candidates, and why each rejected one was rejected."""

    wanted: int
    had: int  # rows in the output before this run
    requests: int = 0
    candidates: int = 0
    accepted: int = 0
    generated_tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    recent: list[int] = field(default_factory=list)  # accepted per request, last few

    @property
    def acceptance(self) -> float:
        return self.accepted / self.candidates if self.candidates else 0.0

    def per_minute(self) -> float:
        return self.accepted / max(time.monotonic() - self.started, 1e-9) * 60

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        lines = [
            f"accepted {self.accepted} of {self.candidates} candidate tasks ({self.acceptance:.0%}) from "
            f"{self.requests} requests in {elapsed:.0f} s ({self.per_minute():.1f} tasks/min, "
            f"{self.generated_tokens / max(elapsed, 1e-9):.1f} generated tokens/s)",
            "rejected: " + (", ".join(f"{reason} {self.rejected[reason]}" for reason in REJECTIONS) or "none"),
        ]
        return "\n".join(lines)


class TeacherYieldsNothing(ConversionError):
    """The teacher's answers keep failing the filters."""


Report = Callable[[Tally], None]


def load_seed_tasks(source: str) -> list[Task]:
    from convert import data

    records = data.load_records(source)
    if records[0].is_chat:
        raise DataError(f"{source}: seed tasks must be Alpaca rows (instruction, input, output), not chat rows")
    return [Task(r.instruction, r.input, r.output) for r in records]


def run(options: GenerateOptions, *, progress: Report | None = None, verbose: bool = False) -> Tally:
    """Generate until the output holds `options.n` rows. Returns the tally of this run."""
    options = options.checked()
    seeds = load_seed_tasks(options.seed_tasks)
    out = OutputFile(options.output)
    tally = Tally(wanted=options.n, had=len(out.rows))
    if len(out.rows) >= options.n:
        return tally
    state = _State(options, seeds, out, tally)
    teacher = _open_teacher(options, verbose)
    try:
        _request_loop(teacher, state, progress)
    finally:
        teacher.engine.close()
    return tally


@dataclass
class _State:
    """Everything the request loop reads and updates, apart from the engine."""

    options: GenerateOptions
    seeds: list[Task]
    out: OutputFile
    tally: Tally
    rng: random.Random = field(init=False)
    index: RougeIndex = field(init=False)
    seed_texts: set[str] = field(init=False)
    generated: list[Task] = field(init=False)

    def __post_init__(self):
        # Seeded by the options and the rows already there: a rerun continues, not repeats.
        self.rng = random.Random(f"{self.options.seed}:{len(self.out.rows)}")
        self.index = RougeIndex()
        self.seed_texts = {normalize(t.instruction) for t in self.seeds}
        for task in self.seeds:
            self.index.add(task.instruction)
        self.generated = [Task(r["instruction"], r.get("input") or "", r["output"]) for r in self.out.rows]
        for task in self.generated:
            self.index.add(task.instruction)

    def examples(self) -> list[Task]:
        shown = self.rng.sample(self.seeds, min(self.options.seed_examples, len(self.seeds)))
        if self.generated:
            shown += self.rng.sample(self.generated, min(self.options.generated_examples, len(self.generated)))
        self.rng.shuffle(shown)
        return shown

    def accept(self, tasks: Iterable[Task], limit: int) -> list[Task]:
        """Filter one answer's tasks, up to `limit` kept; returns those kept (also added to the index)."""
        kept = []
        for task in tasks:
            if len(kept) >= limit:  # enough: the rest are not candidates
                break
            self.tally.candidates += 1
            reason = rejection(task, self.seed_texts)
            if reason is None and self.index.too_similar(task.instruction):
                reason = "too similar"
            if reason is not None:
                self.tally.rejected[reason] += 1
                continue
            self.index.add(task.instruction)
            kept.append(task)
        return kept


def _open_teacher(options: GenerateOptions, verbose: bool):
    from alpaca_chat.loading import choose_template, load_engine

    engine, resolved = load_engine(
        options.teacher,
        n_ctx=options.ctx_per_sequence * options.parallel,
        threads=options.threads,
        verbose=verbose,
        n_seq_max=options.parallel,
    )
    try:
        template = choose_template(engine, "auto", resolved.template)
    except BaseException:
        engine.close()
        raise
    return _Teacher(engine, template)


@dataclass
class _Teacher:
    engine: object
    template: object


def _request_loop(teacher: _Teacher, state: _State, progress: Report | None) -> None:
    from alpaca_chat.conversation import Message, SamplingParams
    from alpaca_chat.engine import ParallelRequest
    from alpaca_chat.engine.grammar import numbered_records_grammar

    options, tally = state.options, state.tally
    max_requests = options.max_requests or 20 * options.n
    in_flight = 0

    def next_request():
        nonlocal in_flight
        missing = options.n - len(state.out.rows)
        if tally.requests >= max_requests or missing <= 0 or in_flight * options.tasks_per_request >= 2 * missing:
            return None
        examples = state.examples()
        message, reply_start = build_request(examples, options.tasks_per_request)
        prompt = teacher.template.render([Message("user", message)], add_generation_prompt=True) + reply_start
        sampling = SamplingParams(
            temperature=options.temperature, top_p=options.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0,
            seed=state.rng.randrange(2**32), max_tokens=options.max_tokens,
            grammar=numbered_records_grammar(["Instruction", "Input", "Output"], len(examples) + 1,
                                             options.tasks_per_request) if options.grammar else None,
        )
        tally.requests += 1
        in_flight += 1
        return ParallelRequest(teacher.engine.tokenize(prompt), sampling, tag=reply_start)

    while len(state.out.rows) < options.n:
        before = tally.requests
        for result in teacher.engine.generate_parallel(next_request):
            in_flight -= 1
            tally.generated_tokens += result.stats.generated_tokens
            tasks, cut = parse_tasks(result.request.tag + result.text, truncated=result.stats.stop_reason == "length")
            tally.rejected["truncated"] += cut
            if not tasks and not cut:
                tally.rejected["unparsed"] += 1
            kept = state.accept(tasks, options.n - len(state.out.rows))
            state.out.append(kept)
            state.generated.extend(kept)
            tally.accepted += len(kept)
            tally.recent = (tally.recent + [len(kept)])[-25:]
            if progress is not None:
                progress(tally)
            _check_yield(tally, max_requests)
        if tally.requests == before:
            break
    if len(state.out.rows) < options.n:
        _give_up(tally, max_requests)


def _check_yield(tally: Tally, max_requests: int) -> None:
    """Stop early when the last 25 answers gave nothing at all."""
    if len(tally.recent) == 25 and not any(tally.recent):
        _give_up(tally, max_requests, recent=True)


def _give_up(tally: Tally, max_requests: int, *, recent: bool = False) -> None:
    why = "the last 25 answers gave no usable task" if recent else f"--max-requests {max_requests} reached"
    raise TeacherYieldsNothing(
        f"stopping: {why} ({tally.accepted} accepted of {tally.candidates} candidates in {tally.requests} "
        f"requests); the rows accepted so far are kept — try a larger teacher model"
    )
