"""Parallel sequences: the scheduling behind `Engine.generate_parallel`.

Several independent requests decode together: each has its own sequence id in
the KV cache and its own sampler, and one llama_decode evaluates a token of
every running request. This module decides which request runs in which
sequence and when it ends; every llama.cpp call goes through the engine
(engine.py stays the only module that imports llama_cpp).
"""

import codecs
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from alpaca_chat.conversation import GenerationStats, SamplingParams, StopStringFilter
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
    seq: int
    tokens: list[int]
    start_pos: int


@dataclass
class _Slot:
    """A running request: its sequence, sampler and text so far."""

    seq: int
    request: ParallelRequest
    sampler: Any
    pos: int
    stops: StopStringFilter
    started: float
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    parts: list[str] = field(default_factory=list)
    next_token: int | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


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
                self.engine._decode_segments(segments, self._sample)
                for s in new:
                    s.stats.prompt_tokens_per_s = len(s.request.tokens) / max(time.perf_counter() - s.started, 1e-9)
                yield from self._take_done()
                if self.cancel is not None and self.cancel.is_set():
                    for slot in list(self.slots.values()):
                        slot.stats.stop_reason = "cancelled"
                        self._finish(slot)
                    yield from self._take_done()
                    return
        finally:
            for slot in self.slots.values():
                self.engine.free_sampler(slot.sampler)

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
            slot = self._open(free.pop(0), request)
            new.append(slot)
        return new

    def _open(self, seq: int, request: ParallelRequest) -> _Slot:
        sampler = self.engine.new_sampler(request.sampling, request.tokens)
        slot = _Slot(seq, request, sampler, len(request.tokens), StopStringFilter(request.stop_strings),
                     time.perf_counter())
        slot.stats.prompt_tokens = len(request.tokens)
        self.slots[seq] = slot
        return slot

    def _sample(self, seg: Segment, idx: int) -> None:
        slot = self.slots[seg.seq]
        engine = self.engine
        if seg.start_pos:  # a generated token was just evaluated
            slot.pos += 1
        token = engine.sample(slot.sampler, idx)
        stats = slot.stats
        if stats.generated_tokens == 0:
            stats.time_to_first_token_s = time.perf_counter() - slot.started
        if engine.is_end_of_generation(token):
            stats.stop_reason = "eos"
            return self._finish(slot)
        stats.generated_tokens += 1
        slot.parts.append(slot.stops.feed(slot.utf8.decode(engine._piece(token))))
        if slot.stops.stopped:
            stats.stop_reason = "stop_string"
            return self._finish(slot)
        if stats.generated_tokens >= slot.request.sampling.max_tokens:
            stats.stop_reason = "length"
            return self._finish(slot)
        slot.next_token = token

    def _finish(self, slot: _Slot) -> None:
        slot.parts.append(slot.stops.feed(slot.utf8.decode(b"", final=True)) + slot.stops.flush())
        elapsed = time.perf_counter() - slot.started - slot.stats.time_to_first_token_s
        slot.stats.generation_tokens_per_s = slot.stats.generated_tokens / max(elapsed, 1e-9)
        self.engine.drop_sequence(slot.seq)
        self.engine.free_sampler(slot.sampler)
        del self.slots[slot.seq]
        self.done.append(ParallelResult(slot.request, "".join(slot.parts), slot.stats))

    def _take_done(self) -> Iterator[ParallelResult]:
        done, self.done = self.done, []
        yield from done

