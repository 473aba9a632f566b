"""Instant resume in the app: KV states saved and restored in thread workers.

Opening a conversation (from the sidebar, with -c, after /model) restores its
saved KV state in a worker, so typing is never blocked; a message sent
meanwhile waits for it inside the session. After each reply, and when the user
leaves a conversation, its state is saved, also in a worker. The session
decides what is saved and whether a file can be trusted; this only schedules.
"""

from functools import partial

from alpaca_chat.tui.messages import StateRestored


class ResumeSaver:
    """Runs the saves and restores as workers of `host` (the app), which gets a StateRestored."""

    def __init__(self, host):
        self._host = host

    def resume(self, session, leaving=None) -> None:
        """Save the session left behind (if any), then restore `session`'s state."""
        left = (leaving, leaving.conversation_id) if leaving is not None else None
        self._run(partial(self._resume, left, session))

    def save(self, session) -> None:
        """Save `session`'s state under the conversation it has now."""
        self._run(partial(session.save_state, session.conversation_id))

    def _run(self, work) -> None:
        self._host.run_worker(work, thread=True, group="kv", exit_on_error=False)

    def _resume(self, left, session) -> None:
        if left is not None:
            left[0].save_state(left[1])
        tokens = session.restore_state()
        if session.restored_tokens:
            self._host.post_message(StateRestored(session, tokens))
