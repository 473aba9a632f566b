"""The engine's public surface, written down: what its clients may call.

`ChatEngine` is what a chat needs (the session, both front ends, the UI tests' scripted fake);
`EngineProtocol` adds what the converter's evaluation and the parallel scheduler use. `Engine`
implements both; nothing outside the engine's own modules calls a name that is not here.
"""

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alpaca_chat.conversation import GenerationStats, SamplingParams


class GenerationLike(Protocol):
    """A reply being generated: iterate for text deltas; `stats` is complete once exhausted."""

    stats: GenerationStats
    text: str

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    def close(self) -> None: ...


class SnapshotLike(Protocol):
    """A copy of sequence 0's KV state: `data` and the `tokens` it holds, until released."""

    data: Any
    tokens: list[int]

    def release(self) -> None: ...


@runtime_checkable
class ChatEngine(Protocol):
    model_path: Path
    n_ctx: int
    kv_type: str
    # Whether snapshot/restore work: a session saves and restores states only then.
    supports_state: bool

    @property
    def chat_template(self) -> str | None: ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, prompt: str | list[int], sampling: SamplingParams, *, stop_strings: tuple[str, ...] = (),
                 cancel: threading.Event | None = None) -> GenerationLike: ...

    # The KV cache of sequence 0, and its state (instant resume).
    @property
    def cached_tokens(self) -> list[int]: ...

    def common_prefix(self, tokens: list[int]) -> int: ...

    def snapshot(self) -> SnapshotLike: ...

    def restore(self, data, tokens: list[int]) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    # LoRA adapters applied at run time (engine/adapters.py): the active set, in order, and its key
    # (content hashes and scales; "" for none), which KV states and reused prefixes are keyed by.
    @property
    def adapters(self) -> tuple[Any, ...]: ...

    @property
    def adapter_key(self) -> str: ...

    def set_adapters(self, specs) -> None: ...


@runtime_checkable
class EngineProtocol(ChatEngine, Protocol):
    n_vocab: int
    n_batch: int
    n_seq_max: int
    n_threads: int
    metadata: dict[str, str]

    @property
    def add_bos(self) -> bool: ...

    @property
    def bos_id(self) -> int: ...

    def tokenize_raw(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_text(self, token: int) -> str: ...

    def token_piece(self, token: int, special: bool = False) -> bytes: ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def state(self) -> tuple[bytes, list[int]]: ...

    # Evaluation (the converter's quality reports).
    def sequence_logits(self, tokens: list[int], start: int = 0) -> Any: ...

    def logits_at(self, idx: int) -> list[float]: ...

    # A sampled token's log-probability (the server's `logprobs`): engine.logprobs.TokenLogprob.
    def token_logprob(self, idx: int, token: int, top_n: int = 0) -> Any: ...

    # Parallel sequences (engine.parallel schedules them through these).
    def generate_parallel(self, next_request: Callable[[], Any], *,
                          cancel: threading.Event | None = None) -> Iterator[Any]: ...

    def new_sampler(self, sampling: SamplingParams, history: list[int]) -> Any: ...

    def sample(self, sampler: Any, idx: int) -> int: ...

    def free_sampler(self, sampler: Any) -> None: ...

    def decode_segments(self, segments: list, on_last: Callable[[Any, int], None]) -> None: ...

    def drop_sequence(self, seq: int) -> None: ...

    def trim_sequence(self, seq: int, keep: int) -> bool: ...

    # A parallel sequence's KV state (the server's prompt cache across restarts).
    def sequence_state(self, seq: int) -> Any: ...

    def load_sequence(self, seq: int, data, tokens: list[int]) -> None: ...
