"""Messages, sampling settings and context budgeting. Pure: no I/O."""

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

from alpaca_chat.errors import ContextOverflowError, UsageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # Extra context for the request (piped stdin). The Alpaca template renders it
    # as "### Input:"; other templates get it appended to the content.
    input: str = ""

    def flattened_content(self) -> str:
        """The content with any input appended, for templates without an input slot."""
        if not self.input:
            return self.content
        return f"{self.content}\n\n{self.input}" if self.content else self.input


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 512
    # A GBNF grammar (root rule "root") the reply must follow; never stored with a conversation.
    grammar: str | None = None

    def validated(self) -> "SamplingParams":
        """Return self, or raise UsageError naming the first out-of-range setting."""
        checks = [
            ("temperature", self.temperature >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("top_k", self.top_k >= 0),
            ("min_p", 0 <= self.min_p <= 1),
            ("repeat_penalty", self.repeat_penalty > 0),
            ("seed", self.seed is None or 0 <= self.seed < 2**32),
            ("max_tokens", self.max_tokens >= 1),
        ]
        for name, ok in checks:
            if not ok:
                raise UsageError(f"invalid value for {name}: {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["grammar"]  # a per-request constraint, not a setting to save
        return data

    @classmethod
    def from_dict(cls, data: dict | None) -> "SamplingParams":
        """Build from stored settings, ignoring unknown keys from newer versions."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def with_changes(self, **changes) -> "SamplingParams":
        return replace(self, **changes).validated()


@dataclass
class ContextFit:
    """The messages that fit in the context window, and the turns dropped to get there."""

    messages: list[Message]
    dropped: list[Message] = field(default_factory=list)
    prompt_tokens: int = 0


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Split into (leading system messages, turns); a turn starts at a user message."""
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    turns: list[list[Message]] = []
    for message in messages[head:]:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return list(messages[:head]), turns


def fit_to_context(
    messages: Sequence[Message],
    count_prompt_tokens: Callable[[list[Message]], int],
    n_ctx: int,
    reply_budget: int,
) -> ContextFit:
    """Drop the oldest turns (never the system prompt) until prompt + reply budget fits.

    The newest turn is never dropped. If it still cannot fit with at least one token
    left for the reply, raise ContextOverflowError: the user must shorten the prompt
    or raise the context size.
    """
    system, turns = split_turns(messages)
    dropped: list[Message] = []
    while True:
        kept = system + [m for turn in turns for m in turn]
        tokens = count_prompt_tokens(kept)
        if tokens + reply_budget <= n_ctx or len(turns) <= 1:
            break
        dropped.extend(turns.pop(0))
    if tokens >= n_ctx:
        raise ContextOverflowError(
            f"the prompt is {tokens} tokens and does not fit in the {n_ctx}-token context "
            "(shorten it or raise --ctx)"
        )
    return ContextFit(messages=kept, dropped=dropped, prompt_tokens=tokens)


STOP_REASONS = ("eos", "length", "stop_string", "cancelled", "context_full")


@dataclass
class GenerationStats:
    """What one reply cost. Field names are the `--json` / database contract."""

    prompt_tokens: int = 0  # the whole rendered prompt
    cached_tokens: int = 0  # of those, reused from the KV cache (not re-evaluated)
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    stop_reason: str = "eos"

    def to_dict(self) -> dict:
        return asdict(self)


class StopStringFilter:
    """Cut streamed text at the first stop string, holding back possible prefixes.

    Text that might be the start of a stop string is withheld until the next
    delta proves otherwise, so a stop string never leaks to the user.
    """

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to show now."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for s in self.stop_strings if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((self._overlap(s) for s in self.stop_strings), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """The withheld tail, once generation ended without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest suffix of pending that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0
