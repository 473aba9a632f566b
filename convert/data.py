"""Training data: load instruction examples, render prompts, mask labels.

Where the examples come from (`load_records`):

* a JSON file holding a list of objects, or a JSONL file (one object a line);
* a directory written by `datasets.Dataset.save_to_disk` (its `train` split);
* a Hugging Face hub dataset id (`owner/name`, its `train` split) when online.

What a row holds: either an Alpaca row (`instruction`, optional `input`,
`output`) or a chat row (`messages`: a list of `{role, content}`). One dataset
holds one kind. Alpaca rows are rendered with `alpaca_chat.templates.alpaca_prompt`,
the single definition the chat app uses, and the response is followed by EOS.
Chat rows are rendered with the base model's chat template (the Alpaca Jinja
template when the model has none); each reply ends with the template's own end
of turn. Loss is on the responses only, unless `train_on_inputs`.

No I/O here apart from reading the data source, and no torch. Every problem is a
`DataError` that names the file and the row (or the line, for JSONL).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alpaca_chat.errors import DataError
from alpaca_chat.templates import ALPACA_JINJA, alpaca_prompt

if TYPE_CHECKING:
    from convert.finetune_config import FinetuneConfig

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's cross-entropy default)
ALPACA = "alpaca"  # the template name recorded for Alpaca rows
CHAT_ROLES = ("system", "user", "assistant")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Data that ships inside the package, by name (see builtin_data/README.md for its license).
BUILTIN_DATA = {"alpaca-seed": Path(__file__).with_name("builtin_data") / "alpaca_seed_tasks.json"}


def resolve_data_name(source: str | Path) -> str | Path:
    """A built-in data set's file for its name (`alpaca-seed`); anything else unchanged."""
    return BUILTIN_DATA.get(str(source), source)


# -- rows --------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One validated example. `where` locates it for messages: 'data.jsonl: line 7'."""

    where: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: tuple[dict, ...] | None = None  # chat rows only

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def to_json(self) -> dict:
        """The row as it would appear in a JSONL file (held-out rows are saved this way)."""
        if self.is_chat:
            return {"messages": [dict(m) for m in self.messages]}
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def load_records(source: str | Path) -> list[Record]:
    """Read and validate every row of a data source (see the module docstring)."""
    text = str(resolve_data_name(source))
    path = Path(text).expanduser()
    if path.is_dir():
        rows = _dataset_dir_rows(path)
    elif path.is_file():
        rows = _file_rows(path)
    elif _HUB_ID.fullmatch(text) and not text.startswith((".", "/")):
        rows = _hub_rows(text)
    else:
        raise DataError(f"data not found: {text} is not a file, a directory or a hub dataset id")
    records = [parse_row(row, where) for where, row in rows]
    if not records:
        raise DataError(f"{text} holds no examples")
    kinds = {r.is_chat for r in records}
    if len(kinds) > 1:
        first_chat = next(r for r in records if r.is_chat)
        raise DataError(
            f"{first_chat.where}: a chat row ('messages') in a dataset of Alpaca rows; use one kind per dataset"
        )
    return records


def parse_row(row: object, where: str) -> Record:
    """Validate one row: an Alpaca row or a chat row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'output', not {_type_name(row)}")
    if "messages" in row:
        return Record(where, messages=_chat_messages(row["messages"], where))
    for key in ("instruction", "output"):
        if row.get(key) is None:
            raise DataError(f"{where}: missing '{key}'")
    for key in ("instruction", "input", "output"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, not {_type_name(value)}")
    for key in ("instruction", "output"):
        if not row[key].strip():
            raise DataError(f"{where}: '{key}' is empty")
    return Record(where, row["instruction"], row.get("input") or "", row["output"])


def _chat_messages(messages: object, where: str) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list, not {_type_name(messages)}")
    checked = []
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i}: 'content' must be a string, not {_type_name(content)}")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(f"{where}: no 'assistant' message, so nothing to learn")
    return tuple(checked)


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _file_rows(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path} is empty")
    if stripped.startswith("["):
        return _json_list_rows(path, text)
    if stripped.startswith("{"):
        return _jsonl_rows(path, text)
    raise DataError(f"{path}: expected a JSON list of examples or JSONL (one JSON object a line)")


def _json_list_rows(path: Path, text: str) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of examples")
    return ((f"{path}: row {i}", row) for i, row in enumerate(rows, 1))


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {number}, column {exc.colno}: {exc.msg}") from None
    return iter(rows)


def _dataset_dir_rows(path: Path) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path} is a directory but not a saved `datasets` dataset (Dataset.save_to_disk writes one)"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path} has no 'train' split (it has: {', '.join(loaded)})")
        loaded = loaded["train"]
    return ((f"{path}: row {i}", row) for i, row in enumerate(loaded, 1))


def _hub_rows(dataset_id: str) -> Iterator[tuple[str, object]]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DataError(f"{dataset_id} is not a local file or directory, and HF_HUB_OFFLINE is set")
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, split="train")
    except (OSError, ValueError, ConnectionError) as exc:
        raise DataError(f"cannot load the hub dataset {dataset_id} (offline, or no such dataset?): {exc}") from None
    return ((f"{dataset_id}: row {i}", row) for i, row in enumerate(loaded, 1))


# -- the validation split ------------------------------------------------------------


def split(records: Sequence[Record], val_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Shuffle with `seed` and hold out `val_size` rows (a fraction below 1, or a count)."""
    n = len(records)
    if val_size < 0:
        raise DataError(f"the validation size must be >= 0, not {val_size}")
    n_val = round(n * val_size) if val_size < 1 else int(val_size)
    if val_size > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n_val >= n:
        raise DataError(f"a validation split of {n_val} leaves no training rows out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = sorted(order[:n_val])
    kept = sorted(order[n_val:])
    return [records[i] for i in kept], [records[i] for i in held_out]


# -- tokenization ----------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized example: `labels` is IGNORE_INDEX where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizeReport:
    examples: int  # kept
    truncated: int  # kept, but cut to max_length
    dropped: int  # too long to keep anything to learn from
    tokens: int  # in the kept examples
    trained_tokens: int  # tokens that carry loss
    too_long: int  # examples longer than max_length (truncated + dropped)
    shortest: int  # tokens in the shortest example before truncation


def template_source(records: Sequence[Record], tokenizer) -> str:
    """The chat template the model is trained with: 'alpaca', or the Jinja text for chat rows."""
    if not records or not records[0].is_chat:
        return ALPACA
    return getattr(tokenizer, "chat_template", None) or ALPACA_JINJA


def tokenize(
    records: Sequence[Record],
    tokenizer,
    *,
    max_length: int,
    train_on_inputs: bool = False,
    source: str = "the data",
    check_fit: bool = True,
) -> tuple[list[Example], TokenizeReport]:
    """Render, tokenize and mask every record; truncate to `max_length` tokens.

    An example whose prompt alone fills `max_length` has nothing left to learn
    from and is dropped. With `check_fit`, a dataset in which every example is
    longer than `max_length` is an error (see `check_some_fit`).
    """
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens, not {max_length}")
    if tokenizer.eos_token_id is None:
        raise DataError("the base model's tokenizer has no EOS token to end responses with")
    template = template_source(records, tokenizer)
    examples, truncated, dropped, too_long, shortest = [], 0, 0, 0, None
    for record in records:
        ids, labels = _render_chat(record, tokenizer, template) if record.is_chat else _render_alpaca(record, tokenizer)
        if train_on_inputs:
            labels = list(ids)
        shortest = len(ids) if shortest is None else min(shortest, len(ids))
        cut = len(ids) > max_length
        too_long += cut
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        truncated += cut
        examples.append(Example(tuple(ids), tuple(labels)))
    report = TokenizeReport(
        examples=len(examples),
        truncated=truncated,
        dropped=dropped,
        tokens=sum(len(e) for e in examples),
        trained_tokens=sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples),
        too_long=too_long,
        shortest=shortest or 0,
    )
    if check_fit:
        check_some_fit([report], max_length, source)
    return examples, report


def check_some_fit(reports: Sequence[TokenizeReport], max_length: int, source: str) -> None:
    """DataError when every example of a dataset is longer than `max_length`: the limit is too small for it."""
    total = sum(r.examples + r.dropped for r in reports)
    if total and sum(r.too_long for r in reports) == total:
        shortest = min(r.shortest for r in reports if r.examples + r.dropped)
        raise DataError(
            f"{source}: every example is longer than --max-length {max_length} tokens "
            f"(the shortest has {shortest}); raise --max-length"
        )


def _render_alpaca(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart, as the chat will see them: the
    # prompt's tokens are exactly those llama.cpp gets before generating.
    prompt = tokenizer(alpaca_prompt(record.instruction, record.input))["input_ids"]
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _render_chat(record: Record, tokenizer, template: str) -> tuple[list[int], list[int]]:
    messages = list(record.messages)
    text = _apply_template(tokenizer, template, messages, record.where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, template, messages[:i], record.where, add_generation_prompt=True)
        through = _apply_template(tokenizer, template, messages[: i + 1], record.where)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"{record.where}: the chat template does not render conversations prefix by prefix, "
                "so replies cannot be told apart from prompts"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
        for token, (offset, _) in zip(ids, encoded["offset_mapping"])
    ]
    return ids, labels


def _apply_template(tokenizer, template: str, messages: list[dict], where: str, add_generation_prompt=False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # noqa: BLE001 - a template is user code; any failure is a data problem
        raise DataError(f"{where}: the chat template failed on this conversation: {exc}") from None


# -- a fine-tune's data, ready to train on -------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    val: list[Example]
    val_records: list[Record]
    template: str  # "alpaca", or the chat template's Jinja text
    train_report: TokenizeReport
    val_report: TokenizeReport | None
    fingerprint: str  # sha256 of the rows, for --resume

    def describe(self, max_length: int) -> str:
        r = self.train_report
        text = f"data: {r.examples} training examples ({r.tokens} tokens, {r.trained_tokens} trained on)"
        if self.val_report:
            text += f", {self.val_report.examples} held out"
        cut = r.truncated + (self.val_report.truncated if self.val_report else 0)
        dropped = r.dropped + (self.val_report.dropped if self.val_report else 0)
        if cut or dropped:
            text += f"; {cut} truncated to {max_length} tokens, {dropped} dropped (prompt alone too long)"
        return text


def prepare_data(config: FinetuneConfig, tokenizer, max_length: int) -> PreparedData:
    """Load, split and tokenize `config.data` (and `config.val_data`) for a fine-tune."""
    records = load_records(config.data)
    if config.val_data:
        train_records, val_records = records, load_records(config.val_data)
    else:
        train_records, val_records = split(records, config.val_size, config.seed)
    common = dict(max_length=max_length, train_on_inputs=config.train_on_inputs, check_fit=False)
    train, train_report = tokenize(train_records, tokenizer, **common)
    val, val_report = [], None
    if val_records:
        val, val_report = tokenize(val_records, tokenizer, **common)
    check_some_fit([r for r in (train_report, val_report) if r], max_length, config.data)
    if not train:
        raise DataError(f"{config.data}: no training example is left after truncation to {max_length} tokens")
    digest = hashlib.sha256(to_jsonl(train_records + val_records).encode()).hexdigest()
    return PreparedData(
        train, val, val_records, template_source(train_records, tokenizer), train_report, val_report, digest
    )


# -- writing held-out rows ---------------------------------------------------------------


def to_jsonl(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
