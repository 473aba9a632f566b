"""Parallel sequences: the scheduling behind `Engine.generate_parallel`.

Several independent requests decode together: each has its own sequence id in
the KV cache and its own `SequenceStep` (sampler, stop strings, limits), and one
llama_decode evaluates a token of every running request. On a CPU a batch of K
tokens costs far less than K single-token steps (the weights are read once per
batch). This module decides which request runs in which sequence and when it
ends, through the engine's public methods only (protocol.EngineProtocol).
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.step import SequenceStep
from alpaca_chat.errors import EngineError


@dataclass
class ParallelRequest:
    """One request of a parallel run: a tokenized prompt and how to sample its reply."""

    tokens: list[int]
    sampling: SamplingParams
    stop_strings: tuple[str, ...] = ()
    tag: Any = None  # the caller's, handed back with the result


@dataclass
class ParallelResult:
    request: ParallelRequest
    text: str
    stats: GenerationStats


@dataclass
class Segment:
    """Tokens to evaluate in sequence `seq` from position `start_pos` on."""

    seq: int
    tokens: list[int]
    start_pos: int


@dataclass
class _Slot:
    """A running request: its sequence, its step and its text so far."""

    seq: int
    request: ParallelRequest
    step: SequenceStep
    pos: int
    parts: list[str] = field(default_factory=list)
    next_token: int | None = None


class ParallelRun:
    """The loop of Engine.generate_parallel: admit requests into free sequences, decode one
    token of every running request per batch, hand back each request as it ends."""

    def __init__(self, engine, next_request, cancel):
        self.engine = engine
        self.next_request = next_request
        self.cancel = cancel
        self.slots: dict[int, _Slot] = {}
        self.done: list[ParallelResult] = []
        self.exhausted = False
        self.held: ParallelRequest | None = None  # pulled, waiting for room in the context

    def results(self) -> Iterator[ParallelResult]:
        try:
            while True:
                new = self._admit()
                if not self.slots:
                    return
                segments = [Segment(s.seq, s.request.tokens, 0) for s in new]
                segments += [Segment(s.seq, [s.next_token], s.pos) for s in self.slots.values() if s not in new]
                self.engine.decode_segments(segments, self._advance)
                for s in new:
                    s.step.prompt_evaluated(len(s.request.tokens))
                yield from self._take_done()
                if self.cancel is not None and self.cancel.is_set():
                    for slot in list(self.slots.values()):
                        self._finish(slot, slot.step.end("cancelled"))
                    yield from self._take_done()
                    return
        finally:
            for slot in self.slots.values():
                slot.step.close()

    def _reserved(self) -> int:
        return sum(len(s.request.tokens) + s.request.sampling.max_tokens for s in self.slots.values())

    def _admit(self) -> list[_Slot]:
        """Pull requests into free sequences while the context has room for them."""
        new: list[_Slot] = []
        free = [seq for seq in range(self.engine.n_seq_max) if seq not in self.slots]
        while free and not self.exhausted:
            request, self.held = self.held or self.next_request(), None
            if request is None:
                self.exhausted = True
                break
            need = len(request.tokens) + request.sampling.max_tokens
            if not request.tokens or need > self.engine.n_ctx:
                raise EngineError(
                    f"a request needs {need} tokens (prompt + max_tokens); the context holds {self.engine.n_ctx}"
                )
            if self.slots and self._reserved() + need > self.engine.n_ctx:
                self.held = request  # admitted once running requests have finished
                break
            step = SequenceStep(self.engine, request.sampling, request.tokens, request.stop_strings)
            slot = _Slot(free.pop(0), request, step, len(request.tokens))
            self.slots[slot.seq] = slot
            new.append(slot)
        return new

    def _advance(self, seg: Segment, idx: int) -> None:
        slot = self.slots[seg.seq]
        if seg.start_pos:  # a generated token was just evaluated
            slot.pos += 1
        if slot.step.finished:  # max_tokens 0: nothing to generate
            return self._finish(slot, "")
        text, token = slot.step.advance(idx)
        slot.parts.append(text)
        if token is None:
            return self._finish(slot, "")
        slot.next_token = token

    def _finish(self, slot: _Slot, tail: str) -> None:
        slot.parts.append(tail)
        self.engine.drop_sequence(slot.seq)
        slot.step.close()
        del self.slots[slot.seq]
        self.done.append(ParallelResult(slot.request, "".join(slot.parts), slot.step.stats))

    def _take_done(self) -> Iterator[ParallelResult]:
        done, self.done = self.done, []
        yield from done
