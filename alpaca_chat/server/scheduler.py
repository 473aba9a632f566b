"""The scheduler: one thread owns the engine and runs continuous batching; the async side
submits requests and reads their text through asyncio queues. Knows nothing of HTTP.

A request waits in a bounded queue (full: `QueueFull`) until a sequence and room in the context
are free, then joins the running batch (`engine.batching.ContinuousBatch`) without waiting for
the others. Its deltas cross back to the event loop with loop.call_soon_threadsafe.
"""

import asyncio
import collections
import threading
from dataclasses import dataclass

from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.batching import ContinuousBatch, StreamRequest
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
    `cancel()` (e.g. the client went away) stops it within a step and frees its sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.stats: GenerationStats | None = None
        self.request: StreamRequest | None = None

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
        if isinstance(item, _End):
            if item.error is not None:
                raise AlpacaChatError(item.error)
            self.stats = item.stats
            raise StopAsyncIteration
        return item


class Scheduler:
    def __init__(self, engine, *, max_queue: int = 64, saved=None):
        self.engine = engine
        self.saved = saved  # prompt_cache.SavedPrefixes: idle sequences saved while nothing runs
        self.max_queue = max_queue
        self._pending: collections.deque[StreamRequest] = collections.deque()
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
        return {"running": self._running, "queued": len(self._pending), "slots": self.engine.n_seq_max,
                "completed": self.completed, "cancelled": self.cancelled,
                **({"saved_states": len(self.saved.held), "restored_states": self.saved.restored}
                   if self.saved is not None else {})}

    def submit(self, tokens: list[int], sampling: SamplingParams, stop_strings: tuple[str, ...] = ()) -> Stream:
        """Queue a request; call from the event loop. Raises QueueFull when `max_queue` wait."""
        stream = Stream(asyncio.get_running_loop())

        def done(stats: GenerationStats) -> None:
            self.cancelled += stats.stop_reason == "cancelled"
            stream._put(_End(stats))

        stream.request = StreamRequest(
            tokens, sampling, on_delta=stream._put, on_done=done,
            on_error=lambda message: stream._put(_End(error=message)), stop_strings=stop_strings)
        with self._wake:
            if self._stopping or not self._thread.is_alive():
                raise Stopping("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(stream.request)
            self._wake.notify()
        return stream

    def _loop(self) -> None:
        batch = ContinuousBatch(self.engine, self.saved)
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not batch.busy and not batch.unsaved:
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = self._take(batch)
                if not admitted and not batch.busy:  # nothing to run: save an idle sequence's state
                    batch.save_idle()
                    continue
                for request in admitted:
                    try:
                        batch.admit(request)
                    except AlpacaChatError as exc:  # e.g. a grammar llama.cpp refuses
                        request.on_error(str(exc))
                    except Exception as exc:  # noqa: BLE001 - one request's failure is not the server's
                        request.on_error(f"internal error: {type(exc).__name__}: {exc}")
                self._running = len(batch.running)
                try:
                    batch.step()
                except AlpacaChatError:
                    pass  # the running requests got the error; the next ones start afresh
                except Exception as exc:  # noqa: BLE001 - a bug must not leave every later request waiting
                    batch.fail_all(f"internal error: {type(exc).__name__}: {exc}")
                self.completed += self._running - len(batch.running)
                self._running = len(batch.running)
        finally:
            batch.close()  # saves the idle sequences not saved yet
            if self.saved is not None:
                self.saved.close()
            with self._wake:
                for request in self._pending:
                    request.on_error("the server is shutting down")
                self._pending.clear()

    def _take(self, batch: ContinuousBatch) -> list[StreamRequest]:
        """Requests to start now, oldest first (cancelled ones are dropped)."""
        taken: list[StreamRequest] = []
        free = batch.free_sequences()
        room = self.engine.n_ctx - batch.reserved()
        while self._pending and len(taken) < free:
            request = self._pending[0]
            if request.cancel.is_set():
                self._pending.popleft()
                request.on_done(GenerationStats(prompt_tokens=len(request.tokens), stop_reason="cancelled"))
                continue
            if request.reserved > room:
                break
            taken.append(self._pending.popleft())
            room -= request.reserved
        return taken
