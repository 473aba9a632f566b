"""Continuous batching: requests join a running batch as sequences free up.

`engine.parallel.ParallelRun` runs a fixed set of requests to completion; a server needs
requests to arrive at any time, stream their text as it is made, and stop when their client
goes away. `ContinuousBatch` is that loop's state, driven by one thread (the owner of the
engine): `admit` a request into a free sequence, `step` to decode one batch (the new prompts
and one token of every running request), and each request's `on_delta`/`on_done` callbacks
are called from that thread. Only the engine's public methods are used (protocol.EngineProtocol).
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.parallel import Segment
from alpaca_chat.engine.step import SequenceStep
from alpaca_chat.errors import EngineError


@dataclass
class StreamRequest:
    """A tokenized prompt, how to sample its reply, and where its text goes.

    `on_delta(text)` is called for each piece of text, `on_done(stats)` once at the end (or
    `on_error(message)` if the request could not start); all from the batching thread, so they
    must be quick and thread-safe (e.g. loop.call_soon_threadsafe). Setting `cancel` stops the
    request within a step and frees its sequence.
    """

    tokens: list[int]
    sampling: SamplingParams
    on_delta: Callable[[str], None]
    on_done: Callable[[GenerationStats], None]
    on_error: Callable[[str], None] = lambda message: None
    stop_strings: tuple[str, ...] = ()
    cancel: threading.Event = field(default_factory=threading.Event)

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
    next_token: int | None = None
    new: bool = True


class ContinuousBatch:
    """Sequences of one engine, filled and emptied while the batch runs (one thread only)."""

    def __init__(self, engine):
        self.engine = engine
        self.running: dict[int, _Running] = {}
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
        seq = next(s for s in range(self.engine.n_seq_max) if s not in self.running)
        step = SequenceStep(self.engine, request.sampling, request.tokens, request.stop_strings)
        self.running[seq] = _Running(seq, request, step, len(request.tokens))

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
                segments.append(Segment(run.seq, run.request.tokens, 0))
            else:
                segments.append(Segment(run.seq, [run.next_token], run.pos))
        try:
            self.engine.decode_segments(segments, self._advance)
        except EngineError as exc:  # llama_decode failed: every running request ends with it
            for run in list(self.running.values()):
                self._fail(run, str(exc))
            raise

    def close(self) -> None:
        """End every running request (cancelled) and free its sequence."""
        for run in list(self.running.values()):
            self._finish(run, run.step.end("cancelled"))

    def _advance(self, seg: Segment, idx: int) -> None:
        run = self.running[seg.seq]
        if run.new:
            run.new = False
            run.step.prompt_evaluated(len(run.request.tokens))
        else:
            run.pos += 1
        text, token = run.step.advance(idx)
        if text:
            run.request.on_delta(text)
        if token is None:
            return self._finish(run, "")
        if run.pos >= self.engine.n_ctx:
            return self._finish(run, run.step.end("context_full"))
        run.next_token = token

    def _release(self, run: _Running) -> None:
        self.engine.drop_sequence(run.seq)
        run.step.close()
        del self.running[run.seq]

    def _finish(self, run: _Running, tail: str) -> None:
        self._release(run)
        if tail:
            run.request.on_delta(tail)
        run.request.on_done(run.step.stats)

    def _fail(self, run: _Running, message: str) -> None:
        self._release(run)
        run.request.on_error(message)
