"""Continuous batching: requests join a running batch as sequences free up.

`engine.parallel.ParallelRun` runs a fixed set of requests to completion; a server needs
requests to arrive at any time, stream their text as it is made, and stop when their client
goes away. `ContinuousBatch` is that loop's state, driven by one thread (the owner of the
engine): `admit` a request into a free sequence, `step` to decode one batch (the new prompts
and one token of every running request), and each request's `on_delta`/`on_done` callbacks
are called from that thread. Only the engine's public methods are used (protocol.EngineProtocol).

Prompt cache: a finished sequence keeps its KV cells (idle) while the context has room; a new
request takes the idle sequence sharing the longest prefix with its prompt and evaluates only the
rest, so a client re-sending its whole history does not re-evaluate the earlier turns. Idle
sequences are evicted, least recently used first, when running requests need the cells.

Across restarts (`saved`, e.g. server.prompt_cache.SavedPrefixes): `save_idle` copies an idle
sequence's state out for saving, and a request whose prompt shares a longer prefix with a saved
state than with any idle sequence has that state loaded into its sequence.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.core import common_prefix
from alpaca_chat.engine.parallel import Segment
from alpaca_chat.engine.step import SequenceStep
from alpaca_chat.errors import EngineError


@dataclass
class StreamRequest:
    """A tokenized prompt, how to sample its reply, and where its text goes.

    `on_delta(text)` is called for each piece of text, `on_done(stats)` once at the end (or
    `on_error(message)` if the request could not start); all from the batching thread, so they
    must be quick and thread-safe (e.g. loop.call_soon_threadsafe). Setting `cancel` stops the
    request within a step and frees its sequence. With `logprobs` (how many alternatives: 0..20),
    `on_logprob(engine.logprobs.TokenLogprob)` is called for each generated token, before its text.
    """

    tokens: list[int]
    sampling: SamplingParams
    on_delta: Callable[[str], None]
    on_done: Callable[[GenerationStats], None]
    on_error: Callable[[str], None] = lambda message: None
    stop_strings: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None
    on_logprob: Callable[[object], None] = lambda entry: None

    @property
    def reserved(self) -> int:
        """The KV cells this request may use: its prompt and every token it may generate."""
        return len(self.tokens) + self.sampling.max_tokens


@dataclass
class _Running:
    seq: int
    request: StreamRequest
    step: SequenceStep
    pos: int
    cached: int = 0  # leading prompt tokens already in the sequence's cells
    next_token: int | None = None
    new: bool = True
    evaluated: list[int] = field(default_factory=list)  # generated tokens in the KV cache


class ContinuousBatch:
    """Sequences of one engine, filled and emptied while the batch runs (one thread only)."""

    # A saved state is loaded only when it gives at least this many more prompt tokens than an idle sequence.
    MIN_RESTORE_GAIN = 64

    def __init__(self, engine, saved=None):
        self.engine = engine
        self.saved = saved  # states on disk: best(tokens), load(id), has(tokens), save(tokens, data)
        self.running: dict[int, _Running] = {}
        # Finished sequences whose cells are kept: seq -> the tokens they hold, least recently used first.
        self.idle: dict[int, list[int]] = {}
        self._unsaved: set[int] = set()  # idle sequences not saved yet
        engine.reset()  # the parallel sequences start from an empty KV cache

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def free_sequences(self) -> int:
        return self.engine.n_seq_max - len(self.running)

    def reserved(self) -> int:
        return sum(r.request.reserved for r in self.running.values())

    def fits(self, request: StreamRequest) -> bool:
        """Whether `request` can start now: a free sequence and room in the shared context."""
        return self.free_sequences() > 0 and self.reserved() + request.reserved <= self.engine.n_ctx

    def admit(self, request: StreamRequest) -> None:
        """Start `request` in a free sequence; its prompt is evaluated by the next `step`."""
        if not request.tokens or request.reserved > self.engine.n_ctx:
            raise EngineError(f"a request needs {request.reserved} tokens (prompt + max_tokens); "
                              f"the context holds {self.engine.n_ctx}")
        if not self.fits(request):
            raise EngineError("no free sequence for this request")
        seq, cached = self._choose_sequence(request.tokens)
        self._make_room(request.reserved)
        seq, cached = self._restore_saved(request, seq, cached)
        step = SequenceStep(self.engine, request.sampling, request.tokens, request.stop_strings,
                            logprobs=request.logprobs)
        step.stats.cached_tokens = cached
        self.running[seq] = _Running(seq, request, step, len(request.tokens), cached)

    def _choose_sequence(self, tokens: list[int]) -> tuple[int, int]:
        """A sequence for a new prompt and how many of its tokens it already holds: the idle one
        sharing the longest prefix (if that is at least half of what it holds, or no sequence is
        empty: a shared system prompt alone is not worth another conversation's cache), else an
        empty one, else the least recently used idle one."""
        best, best_len = None, 0
        for seq, held in self.idle.items():
            n = min(common_prefix(tokens, held), len(tokens) - 1)  # one token is evaluated for logits
            if n > best_len:
                best, best_len = seq, n
        empty = [s for s in range(self.engine.n_seq_max) if s not in self.running and s not in self.idle]
        if best is not None and (2 * best_len >= len(self.idle[best]) or not empty):
            del self.idle[best]
            self._unsaved.discard(best)
            return best, best_len if self.engine.trim_sequence(best, best_len) else 0
        if empty:
            return empty[0], 0
        seq = next(iter(self.idle))
        self._evict(seq)
        return seq, 0

    def _restore_saved(self, request: StreamRequest, seq: int, cached: int) -> tuple[int, int]:
        """Load the saved state sharing the longest prefix with the prompt into `seq`, if it gives
        more than the `cached` tokens `seq` holds; (seq, the tokens it now holds for the prompt)."""
        if self.saved is None:
            return seq, cached
        sid, n = self.saved.best(request.tokens)
        n = min(n, len(request.tokens) - 1)
        if sid is None or n < cached + self.MIN_RESTORE_GAIN:
            return seq, cached
        state = self.saved.load(sid)
        if state is None:
            return seq, cached
        self._make_room(max(request.reserved, len(state.tokens)))
        try:
            self.engine.load_sequence(seq, state.payload, state.tokens)
        except EngineError:
            return seq, 0  # the sequence was emptied
        return seq, n if self.engine.trim_sequence(seq, n) else 0

    def save_idle(self) -> bool:
        """Copy one idle, unsaved sequence's state out to `saved` (False: nothing left to save)."""
        while self.saved is not None and self._unsaved:
            seq = self._unsaved.pop()
            tokens = self.idle.get(seq)
            if tokens is None or len(tokens) < self.saved.min_tokens or self.saved.has(tokens):
                continue
            try:
                self.saved.save(tokens, self.engine.sequence_state(seq))
            except EngineError:
                continue  # not saved: the cells stay usable in memory
            return True
        return False

    @property
    def unsaved(self) -> bool:
        """Whether `save_idle` may have something to save."""
        return self.saved is not None and bool(self._unsaved)

    def _make_room(self, need: int) -> None:
        """Evict idle sequences until running requests and `need` more cells fit the context."""
        while self.idle and self.reserved() + sum(map(len, self.idle.values())) + need > self.engine.n_ctx:
            self._evict(next(iter(self.idle)))

    def _evict(self, seq: int) -> None:
        del self.idle[seq]
        self._unsaved.discard(seq)
        self.engine.drop_sequence(seq)

    def step(self) -> None:
        """Drop cancelled requests, then evaluate one batch: new prompts, one token of the others."""
        for run in list(self.running.values()):
            if run.request.cancel.is_set():
                self._finish(run, run.step.end("cancelled"))
            elif run.step.finished:  # max_tokens 0
                self._finish(run, "")
        if not self.running:
            return
        segments = []
        for run in self.running.values():
            if run.new:
                segments.append(Segment(run.seq, run.request.tokens[run.cached:], run.cached))
            else:
                segments.append(Segment(run.seq, [run.next_token], run.pos))
        try:
            self.engine.decode_segments(segments, self._advance)
        except EngineError as exc:  # llama_decode failed: every running request ends with it
            self.fail_all(str(exc))
            raise

    def fail_all(self, message: str) -> None:
        """End every running request with an error (their sequences are dropped, not kept)."""
        for run in list(self.running.values()):
            self._fail(run, message)

    def close(self) -> None:
        """End every running request (cancelled) and free its sequence."""
        for run in list(self.running.values()):
            self._finish(run, run.step.end("cancelled"))
        while self.save_idle():
            pass
        for seq in list(self.idle):
            self._evict(seq)

    def _advance(self, seg: Segment, idx: int) -> None:
        run = self.running[seg.seq]
        if run.new:
            run.new = False
            run.step.prompt_evaluated(len(run.request.tokens) - run.cached)
        else:
            run.pos += 1
            run.evaluated.append(run.next_token)
        text, token = run.step.advance(idx)
        if run.step.last_logprob is not None:
            run.request.on_logprob(run.step.last_logprob)
            run.step.last_logprob = None
        if text:
            run.request.on_delta(text)
        if token is None:
            return self._finish(run, "")
        if run.pos >= self.engine.n_ctx:
            return self._finish(run, run.step.end("context_full"))
        run.next_token = token

    def _release(self, run: _Running, *, keep: bool) -> None:
        run.step.close()
        del self.running[run.seq]
        if keep and not run.new:  # its cells hold the prompt and the evaluated reply: kept for reuse
            self.idle[run.seq] = run.request.tokens + run.evaluated
            self._unsaved.add(run.seq)
        else:
            self.engine.drop_sequence(run.seq)

    def _finish(self, run: _Running, tail: str) -> None:
        self._release(run, keep=True)
        if tail:
            run.request.on_delta(tail)
        run.request.on_done(run.step.stats)

    def _fail(self, run: _Running, message: str) -> None:
        self._release(run, keep=False)
        run.request.on_error(message)
