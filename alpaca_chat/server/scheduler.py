"""The scheduler: one thread owns the engine and runs continuous batching; the async side
submits requests and reads their text through asyncio queues. Knows nothing of HTTP.

A request waits in a bounded queue (full: `QueueFull`) until a sequence and room in the context
are free, then joins the running batch (`engine.batching.ContinuousBatch`) without waiting for
the others. Its deltas cross back to the event loop with loop.call_soon_threadsafe.

Adapter sets (`--lora`): a request names its variant (server.adapters.Variant); llama.cpp applies
an adapter set to the whole context, so one batch runs one set. A request of the running set joins
while no request of another set has waited longer; once the batch drains, the set of the oldest
waiting request runs next and takes all of its waiting requests at once (every set gets its turn,
and each turn batches what it can). A switch saves the idle sequences to the old set's prompt
cache and starts an empty batch: in-memory KV cells are never reused across sets.
"""

import asyncio
import collections
import threading
from dataclasses import dataclass

from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.batching import ContinuousBatch, StreamRequest
from alpaca_chat.engine.logprobs import TokenLogprob
from alpaca_chat.errors import AlpacaChatError


class QueueFull(Exception):
    """Too many requests are waiting."""


class Stopping(QueueFull):
    """The scheduler is stopping (or has stopped): no request is taken."""


@dataclass
class _End:
    stats: GenerationStats | None = None
    error: str | None = None


class Stream:
    """The async side of one request: iterate for text deltas; `stats` is set at the end;
    `cancel()` (e.g. the client went away) stops it within a step and frees its sequence.
    With logprobs, each generated token's TokenLogprob is appended to `logprobs` before its text
    is yielded (the text of a token may be held back: a stop string may be starting)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.stats: GenerationStats | None = None
        self.request: StreamRequest | None = None
        self.logprobs: list[TokenLogprob] = []

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down)
            pass

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self.stats is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, TokenLogprob):
            self.logprobs.append(item)
            item = await self._queue.get()
        if isinstance(item, _End):
            if item.error is not None:
                raise AlpacaChatError(item.error)
            self.stats = item.stats
            raise StopAsyncIteration
        return item


class Scheduler:
    def __init__(self, engine, *, max_queue: int = 64, saved=None, variants=None):
        """`variants`: model id -> server.adapters.Variant (its adapters and prompt cache); without
        them, one variant "" of the engine as loaded, with `saved` (prompt_cache.SavedPrefixes)."""
        self.engine = engine
        self.variants = variants if variants is not None else {"": _Variant((), saved)}
        self.active = next(iter(self.variants))  # the engine is loaded on the first (the base)
        self.max_queue = max_queue
        self.switches = 0
        self._fresh = True  # no request taken since the set was switched: all its waiting requests may join
        self._pending: collections.deque[tuple[str, StreamRequest]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._running = 0
        self.completed = 0
        self.cancelled = 0  # requests stopped early (their client went away)
        self._thread = threading.Thread(target=self._loop, name="alpaca-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def status(self) -> dict:
        saved = [v.saved for v in self.variants.values() if v.saved is not None]
        return {"running": self._running, "queued": len(self._pending), "slots": self.engine.n_seq_max,
                "completed": self.completed, "cancelled": self.cancelled,
                **({"saved_states": sum(len(s.held) for s in saved), "restored_states": sum(s.restored for s in saved)}
                   if saved else {}),
                **({"active_model": self.active, "adapter_switches": self.switches}
                   if len(self.variants) > 1 else {})}

    def submit(self, tokens: list[int], sampling: SamplingParams, stop_strings: tuple[str, ...] = (),
               variant: str | None = None, logprobs: int | None = None) -> Stream:
        """Queue a request for `variant` (a key of `variants`; None: the first); call from the event
        loop. `logprobs`: None, or how many alternatives to report per token. Raises QueueFull when
        `max_queue` wait."""
        variant = next(iter(self.variants)) if variant is None else variant
        if variant not in self.variants:
            raise KeyError(variant)
        stream = Stream(asyncio.get_running_loop())

        def done(stats: GenerationStats) -> None:
            self.cancelled += stats.stop_reason == "cancelled"
            stream._put(_End(stats))

        stream.request = StreamRequest(
            tokens, sampling, on_delta=stream._put, on_done=done,
            on_error=lambda message: stream._put(_End(error=message)), stop_strings=stop_strings,
            logprobs=logprobs, on_logprob=stream._put)
        with self._wake:
            if self._stopping or not self._thread.is_alive():
                raise Stopping("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append((variant, stream.request))
            self._wake.notify()
        return stream

    def _loop(self) -> None:
        batch = ContinuousBatch(self.engine, self.variants[self.active].saved)
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not batch.busy and not batch.unsaved:
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = self._take(batch)
                    switch_to = self._next_variant(batch, admitted)
                if switch_to is not None:
                    batch = self._switch(batch, switch_to)
                    continue
                if not admitted and not batch.busy:  # nothing to run: save an idle sequence's state
                    batch.save_idle()
                    continue
                self._admit(batch, admitted)
                self._step(batch)
        finally:
            batch.close()  # saves the idle sequences not saved yet
            for variant in self.variants.values():
                if variant.saved is not None:
                    variant.saved.close()
            with self._wake:
                for _, request in self._pending:
                    request.on_error("the server is shutting down")
                self._pending.clear()

    def _admit(self, batch: ContinuousBatch, admitted: list[StreamRequest]) -> None:
        for request in admitted:
            try:
                batch.admit(request)
            except AlpacaChatError as exc:  # e.g. a grammar llama.cpp refuses
                request.on_error(str(exc))
            except Exception as exc:  # noqa: BLE001 - one request's failure is not the server's
                request.on_error(f"internal error: {type(exc).__name__}: {exc}")
        self._running = len(batch.running)

    def _step(self, batch: ContinuousBatch) -> None:
        try:
            batch.step()
        except AlpacaChatError:
            pass  # the running requests got the error; the next ones start afresh
        except Exception as exc:  # noqa: BLE001 - a bug must not leave every later request waiting
            batch.fail_all(f"internal error: {type(exc).__name__}: {exc}")
        self.completed += self._running - len(batch.running)
        self._running = len(batch.running)

    def _take(self, batch: ContinuousBatch) -> list[StreamRequest]:
        """Requests of the running set to start now, oldest first (cancelled ones are dropped). Right
        after a switch every waiting request of the set may join; later ones only while no request of
        another set has waited longer."""
        taken: list[StreamRequest] = []
        free = batch.free_sequences()
        room = self.engine.n_ctx - batch.reserved()
        kept: collections.deque = collections.deque()
        other_waiting = False
        while self._pending:
            variant, request = self._pending.popleft()
            if request.cancel.is_set():
                request.on_done(GenerationStats(prompt_tokens=len(request.tokens), stop_reason="cancelled"))
                continue
            joins = variant == self.active and (self._fresh or not other_waiting)
            if joins and len(taken) < free and request.reserved <= room:
                taken.append(request)
                room -= request.reserved
                continue
            other_waiting = True  # another set's, or one that does not fit yet: later ones wait behind it
            kept.append((variant, request))
        self._pending = kept
        self._fresh = self._fresh and not taken
        return taken

    def _next_variant(self, batch: ContinuousBatch, admitted: list[StreamRequest]) -> str | None:
        """The set to switch to: that of the oldest waiting request, once the batch has drained."""
        if batch.busy or admitted or not self._pending:
            return None
        variant = self._pending[0][0]
        return variant if variant != self.active else None

    def _switch(self, batch: ContinuousBatch, variant: str) -> ContinuousBatch:
        """Run `variant`'s adapters from now on: the old batch's idle sequences saved and dropped,
        a fresh batch (its KV cells computed under the new set only). If the engine refuses the set,
        that set's waiting requests fail and the old set stays."""
        batch.close()
        try:
            self.engine.set_adapters(self.variants[variant].adapters)
        except Exception as exc:  # noqa: BLE001 - one set's failure is not the server's
            message = str(exc) if isinstance(exc, AlpacaChatError) else f"internal error: {type(exc).__name__}: {exc}"
            with self._wake:
                failed = [r for v, r in self._pending if v == variant]
                self._pending = collections.deque((v, r) for v, r in self._pending if v != variant)
            for request in failed:
                request.on_error(f"the adapters of {variant} could not be applied: {message}")
            return ContinuousBatch(self.engine, self.variants[self.active].saved)
        self.active, self._fresh = variant, True
        self.switches += 1
        return ContinuousBatch(self.engine, self.variants[variant].saved)


@dataclass
class _Variant:
    """What the scheduler needs of a server.adapters.Variant."""

    adapters: tuple
    saved: object = None
