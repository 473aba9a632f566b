"""Instant resume in the app: KV states saved and restored in thread workers.

Opening a conversation (from the sidebar, with -c, after /model) restores its
saved KV state in a worker, so typing is never blocked; a message sent
meanwhile waits for it inside the session. After each reply, and when the user
leaves a conversation, its state is saved, also in a worker. The session
decides what is saved and whether a file can be trusted; this only schedules.
"""

from textual import work
from textual.message import Message


class StateRestored(Message):
    def __init__(self, session, tokens: int):
        super().__init__()
        self.session, self.tokens = session, tokens


class ResumeMixin:
    """Methods of ChatApp (needs .session, .status)."""

    def resume_session(self, leaving=None) -> None:
        """Save the conversation left behind (if any), then restore the current one's state."""
        if self.session is None:
            return
        left = (leaving, leaving.conversation_id) if leaving is not None else None
        self._resume_worker(left, self.session)

    def save_session_state(self) -> None:
        """Save the current conversation's state (after a reply is shown, or before leaving it)."""
        if self.session is not None:
            self._save_worker(self.session, self.session.conversation_id)

    @work(thread=True, group="kv", exit_on_error=False)
    def _resume_worker(self, left, session) -> None:
        if left is not None:
            left[0].save_state(left[1])
        tokens = session.restore_state()
        if session.restored_tokens:
            self.post_message(StateRestored(session, tokens))

    @work(thread=True, group="kv", exit_on_error=False)
    def _save_worker(self, session, conversation_id) -> None:
        session.save_state(conversation_id)

    def on_state_restored(self, message: StateRestored) -> None:
        if message.session is self.session:
            self.status.note = f"restored {message.tokens:,} tokens"
