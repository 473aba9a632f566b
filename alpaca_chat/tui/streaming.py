"""The streaming scheduler of the chat app: when streamed text is drawn.

The generation worker appends deltas to a StreamBuffer; a UI timer drains it
into the reply's Markdown in batches, paced so that drawing costs the UI thread
a small share of the CPU llama.cpp wants, and held back while the user types so
that keys never wait behind a batch. Mixed into ChatApp, which owns the
buffer, the reply view, the status bar and the state.
"""

import time

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


def next_flush_delay(ui_cpu_spent_s: float) -> float:
    """Seconds until the next batch, given the UI thread's CPU time since the last one."""
    return min(FLUSH_MAX_S, max(FLUSH_MIN_S, ui_cpu_spent_s / UI_CPU_BUDGET))


def typing_recently(typed_at: float, now: float) -> bool:
    """Whether a key was pressed within TYPING_PAUSE_S (then batches wait for the next key)."""
    return now - typed_at < TYPING_PAUSE_S


class StreamingMixin:
    """Methods of ChatApp: drawing a streaming reply in batches."""

    def on_text_area_changed(self) -> None:
        if self.prompt.text:  # typing, not the box emptied as a message is sent
            self._typed_at = time.perf_counter()
        if self._after_key is not None:
            self.call_after_refresh(self._run_after_key)

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
        if self.generating:
            now = time.thread_time()  # CPU time of this, the UI thread
            spent, self._ui_cpu = now - self._ui_cpu, now
            delay = next_flush_delay(spent)
            self._flush_timer = self.set_timer(delay, self._flush_tick)

    async def _flush(self) -> None:
        text = self._buffer.drain()
        if text and self._reply_view is not None:
            await self._reply_view.write(text)
            self.status.spin += 1
        progress = self._buffer.progress
        if progress is not None:
            self.status.ctx_used = progress.prompt_tokens + progress.generated_tokens
