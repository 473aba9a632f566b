"""The reply being generated: a worker streams it, a UI timer draws it.

The generation worker appends deltas to a StreamBuffer; a UI timer drains it
into the reply's Markdown in batches, paced so that drawing costs the UI thread
a small share of the CPU llama.cpp wants, and held back while the user types so
that keys never wait behind a batch. `ReplyStream` owns all of that: the
buffer, the cancel event, the timers and the GIL switch interval.
"""

import sys
import threading
import time
from functools import partial

from textual import work
from textual.message import Message
from textual.widget import Widget
from textual.worker import get_current_worker

from alpaca_chat.tui.messages import describe_error
from alpaca_chat.tui.widgets import StreamBuffer

# Streamed text moves from the generation thread to the screen in batches.
# A batch costs a re-layout and a redraw of the transcript, and on a laptop
# every cycle the UI thread spends is one llama.cpp's threads do not get. So
# the next batch waits until the UI thread's CPU time since the last one
# (the batch, the redraw it caused, and anything else the app did meanwhile)
# is at most UI_CPU_BUDGET of the time between them, and never less than
# FLUSH_MIN_S, never more than FLUSH_MAX_S.
FLUSH_MIN_S = 0.15
FLUSH_MAX_S = 1.0
UI_CPU_BUDGET = 0.04
# A batch keeps the UI thread busy for tens of ms, and a key pressed meanwhile
# waits. So while the user types, a batch that falls due (or the end of the
# reply) waits for the next key press to be drawn and goes right after it (keys
# are rarely under 100 ms apart), or for a pause of TYPING_PAUSE_S.
TYPING_PAUSE_S = 0.3
# While a reply streams, the generation thread needs the GIL briefly for every
# token. By default a thread waits up to 5 ms for the GIL, which the UI thread
# holds while it draws a batch: at 100 tok/s that alone costs several percent.
GIL_SWITCH_S = 0.0005


def next_flush_delay(ui_cpu_spent_s: float) -> float:
    """Seconds until the next batch, given the UI thread's CPU time since the last one."""
    return min(FLUSH_MAX_S, max(FLUSH_MIN_S, ui_cpu_spent_s / UI_CPU_BUDGET))


def typing_recently(typed_at: float, now: float) -> bool:
    """Whether a key was pressed within TYPING_PAUSE_S (then batches wait for the next key)."""
    return now - typed_at < TYPING_PAUSE_S


class Generated(Message, bubble=False):
    """From the worker to its ReplyStream: no more text will come."""

    def __init__(self, reply, error: str | None):
        super().__init__()
        self.reply, self.error = reply, error


class ReplyStream(Widget):
    """Streams one reply at a time into an AssistantMessage; shows nothing itself.

    `start` it with the reply's view and a `send(cancel=...)` that returns the
    session's Reply; tell it about typing with `typed`; `stop` cancels. When
    the reply is over and drawn, it posts `ReplyStream.Finished`.
    """

    DEFAULT_CSS = "ReplyStream { display: none; }"

    class Finished(Message):
        """The reply is over and all of it is on screen (reply None: refused before it started)."""

        def __init__(self, reply, error: str | None):
            super().__init__()
            self.reply, self.error = reply, error

    def __init__(self, status):
        super().__init__()
        self._status = status  # the StatusBar: it turns and counts the context as text arrives
        self._buffer = StreamBuffer()
        self._cancel = threading.Event()
        self._view = None
        self._flush_timer = None
        self._ui_cpu = 0.0
        self._typed_at = 0.0
        self._after_key = None  # what waits for the next key press (or a pause in typing)
        self._after_key_timer = None
        self._switch_interval = sys.getswitchinterval()

    def start(self, view, send) -> None:
        """Stream the reply `send(cancel=...)` returns into `view`, once the view is drawn."""
        self._view = view
        self._buffer = StreamBuffer()
        self._cancel = threading.Event()
        # Start once the new messages are drawn: mounting them is the UI's costliest
        # moment, best not spent racing llama.cpp for the CPU.
        self.call_after_refresh(self._begin, send)

    def stop(self) -> None:
        """Ask the reply to stop; what came so far is kept."""
        self._cancel.set()

    def typed(self, text: str) -> None:
        """The message box changed (to `text`): hold batches while the user types."""
        if text:  # typing, not the box emptied as a message is sent
            self._typed_at = time.perf_counter()
        if self._after_key is not None:
            self.call_after_refresh(self._run_after_key)

    def _begin(self, send) -> None:
        self._ui_cpu = time.thread_time()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_S)
        self._flush_timer = self.set_timer(FLUSH_MIN_S, self._flush_tick)
        self._generate(send, self._buffer, self._cancel)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, send, buffer: StreamBuffer, cancel: threading.Event) -> None:
        worker = get_current_worker()
        reply, error = None, None
        try:
            reply = send(cancel=cancel)
            buffer.progress = reply.progress
            for delta in reply:
                buffer.append(delta)
                if worker.is_cancelled:
                    cancel.set()
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            error = describe_error(exc)
        self.post_message(Generated(reply, error))

    async def on_generated(self, message: Generated) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        if not self._wait_for_typing(partial(self._finish, message)):
            await self._finish(message)

    async def _finish(self, message: Generated) -> None:
        self._drop_after_key()  # a batch still waiting for a key press: this final one covers it
        sys.setswitchinterval(self._switch_interval)
        await self._flush()
        view, self._view = self._view, None
        reply = message.reply
        if reply is None:  # refused before it started (e.g. the prompt does not fit)
            await view.remove()
        else:
            stopped = reply.stats is not None and reply.stats.stop_reason == "cancelled"
            view.set_status("error" if message.error else "stopped" if stopped else "complete")
        self.post_message(self.Finished(reply, message.error))

    # -- batches ---------------------------------------------------------------

    def _wait_for_typing(self, callback) -> bool:
        """While the user types, hold callback until just after the next key press is drawn
        (or a pause in typing) and return True; otherwise return False."""
        if not typing_recently(self._typed_at, time.perf_counter()):
            return False
        self._drop_after_key()
        self._after_key = callback
        self._after_key_timer = self.set_timer(TYPING_PAUSE_S, self._run_after_key)
        return True

    async def _run_after_key(self) -> None:
        callback = self._after_key
        self._drop_after_key()
        if callback is not None:
            await callback()

    def _drop_after_key(self) -> None:
        self._after_key = None
        if self._after_key_timer is not None:
            self._after_key_timer.stop()
            self._after_key_timer = None

    async def _flush_tick(self) -> None:
        """Show what streamed in; wait longer before the next batch if the UI has been busy."""
        if self._wait_for_typing(self._flush_and_schedule):
            return
        await self._flush_and_schedule()

    async def _flush_and_schedule(self) -> None:
        await self._flush()
        if self._flush_timer is not None:  # still generating
            now = time.thread_time()  # CPU time of this, the UI thread
            spent, self._ui_cpu = now - self._ui_cpu, now
            self._flush_timer = self.set_timer(next_flush_delay(spent), self._flush_tick)

    async def _flush(self) -> None:
        text = self._buffer.drain()
        if text and self._view is not None:
            await self._view.write(text)
            self._status.spin += 1
        progress = self._buffer.progress
        if progress is not None:
            self._status.ctx_used = progress.prompt_tokens + progress.generated_tokens
