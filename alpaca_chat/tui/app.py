"""The full-screen chat app.

The app owns the session, the store and two kinds of thread workers: one that
loads a model and one that streams a reply. Workers never touch a widget: a
reply's text goes into a StreamBuffer that a UI timer drains into the reply's
Markdown, and everything else comes back as messages.
"""

import gc
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Input
from textual.worker import get_current_worker

from alpaca_chat.commands import is_command
from alpaca_chat.config import Settings
from alpaca_chat.errors import AlpacaChatError
from alpaca_chat.loading import LoadedModel, kept_rows, load_model, new_session
from alpaca_chat.tui.clipboard import copy_to_system
from alpaca_chat.tui.commands import CommandsMixin
from alpaca_chat.tui.resume import ResumeMixin
from alpaca_chat.tui.streaming import FLUSH_MIN_S, StreamingMixin
from alpaca_chat.tui.screens import ConfirmScreen, HelpScreen, TextPromptScreen
from alpaca_chat.tui.widgets import PromptInput, Sidebar, StatusBar, StreamBuffer, Transcript

# While a reply streams, the generation thread needs the GIL briefly for every
# token. By default a thread waits up to 5 ms for the GIL, which the UI thread
# holds while it draws a batch: at 100 tok/s that alone costs several percent.
GIL_SWITCH_S = 0.0005
SPINNER_INTERVAL_S = 0.25
SIDEBAR_LIMIT = 200


def describe_error(exc: BaseException) -> str:
    """One line for a notification: our errors speak for themselves, others get their type."""
    if isinstance(exc, AlpacaChatError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class ModelLoaded(Message):
    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.loaded = loaded


class ModelFailed(Message):
    def __init__(self, spec: str | None, error: str):
        super().__init__()
        self.spec, self.error = spec, error


class ReplyFinished(Message):
    def __init__(self, reply, error: str | None):
        super().__init__()
        self.reply, self.error = reply, error


class ChatApp(StreamingMixin, ResumeMixin, CommandsMixin, App[int]):
    CSS_PATH = "chat.tcss"
    TITLE = "alpaca-chat"
    BINDINGS = [
        # Hidden: the status bar says when Esc stops something. Showing it in the
        # footer would rebuild the footer as every reply starts, while llama.cpp works.
        Binding("escape", "stop", "Stop", show=False),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit last", priority=True),
        Binding("ctrl+o", "copy_reply", "Copy"),
        Binding("ctrl+f", "filter", "Filter", show=False),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        settings: Settings,
        store=None,
        saved=None,
        *,
        loader: Callable[[str | None], LoadedModel] | None = None,
        verbose: bool = False,
    ):
        super().__init__()
        self.settings = settings
        self.store = store
        self.conversation = saved  # the conversation on screen (None: a new one)
        self.loader = loader or (lambda spec: load_model(spec, settings, verbose=verbose))
        self.model_spec = settings.model or (saved.model if saved else None)
        self.session = None  # once a model is loaded
        self.loaded: LoadedModel | None = None
        self.state = "starting"
        self.last_stats = None
        self.editing = False  # the prompt holds the last message, to send again
        self.hidden = 0  # messages cleared off the screen with /clear
        self._cancel = threading.Event()
        self._buffer = StreamBuffer()
        self._reply_view = None
        self._flush_timer = None
        self._spinner = None
        self._ui_cpu = 0.0
        self._typed_at = 0.0
        self._after_key = None  # what waits for the next key press (or a pause in typing)
        self._after_key_timer = None
        self._switch_interval = sys.getswitchinterval()

    # -- layout --------------------------------------------------------------

    def compose(self):
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    async def on_mount(self) -> None:
        self.sidebar.display = False
        self.prompt.focus()
        if self.store is not None and self.store.recovered_from is not None:
            self.notify(f"The history database was corrupt; it was moved to {self.store.recovered_from}",
                        severity="warning", timeout=10, markup=False)
        await self._show_conversation(self.conversation)
        self.load(self.model_spec)

    def on_unmount(self) -> None:
        self._cancel.set()

    # -- state ---------------------------------------------------------------

    def set_state(self, state: str) -> None:
        self.state = state
        self.status.state = state
        busy = state.startswith("loading")  # while generating, the flushes show progress
        if busy and self._spinner is None:
            self._spinner = self.set_interval(SPINNER_INTERVAL_S, self._spin)
        elif not busy and self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def _spin(self) -> None:
        self.status.spin += 1

    @property
    def generating(self) -> bool:
        return self.state == "generating"

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.generating or self.editing
        if action in ("regenerate", "edit_last", "copy_reply", "new_conversation", "toggle_sidebar", "filter"):
            # Only on the chat screen, not over a dialog.
            return self.screen is self.screen_stack[0]
        return True

    def report(self, exc: BaseException) -> None:
        self.notify(describe_error(exc), title="Error", severity="error", timeout=8, markup=False)

    def _busy(self, doing: str) -> bool:
        """Refuse (with a note) what cannot happen while a reply streams or a model loads."""
        if self.generating:
            self.notify(f"A reply is being generated: press Esc to stop it before you {doing}.",
                        severity="warning", markup=False)
            return True
        return False

    def _need_session(self) -> bool:
        """A model to talk to, and not one being swapped in under the conversation."""
        if self.state.startswith("loading"):
            self.notify("The model is still loading.", severity="warning", markup=False)
            return False
        if self.session is None:
            self.notify("No model is loaded: use /model NAME_OR_PATH.", severity="warning", markup=False)
            return False
        return True

    # -- loading the model ---------------------------------------------------

    def load(self, spec: str | None) -> None:
        self.set_state(f"loading {spec or 'the default model'}")
        self._load_model(spec)

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def _load_model(self, spec: str | None) -> None:
        try:
            loaded = self.loader(spec)
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            self.post_message(ModelFailed(spec, describe_error(exc)))
        else:
            self.post_message(ModelLoaded(loaded))

    def on_model_loaded(self, message: ModelLoaded) -> None:
        old, self.loaded = self.loaded, message.loaded
        try:
            if self.session is None:
                self.session = new_session(self.loaded, self.settings, self.store, self.conversation)
            else:
                self.session.switch_model(self.loaded.engine, self.loaded.template, self.loaded.label)
        except AlpacaChatError as exc:
            self.report(exc)
        if old is not None and old.engine is not self.loaded.engine:
            old.engine.close()
        if old is None:
            # What is alive now (modules, widgets, the model's objects) lasts as long as the
            # app. Take it out of the collector's full passes: with it they take tens of ms,
            # a pause in the middle of a streaming reply.
            gc.freeze()
        self.status.model = self.loaded.display_name
        self.status.ctx_total = self.loaded.engine.n_ctx
        self.set_state("ready")
        self.update_context()
        self.resume_session()  # the conversation's saved KV state, in a worker

    def on_model_failed(self, message: ModelFailed) -> None:
        self.notify(f"Could not load {message.spec or 'the default model'}: {message.error}",
                    title="Model", severity="error", timeout=10, markup=False)
        self.set_state("ready" if self.session is not None else "no model")

    def update_context(self) -> None:
        if self.session is None:
            self.status.ctx_used = 0
            return
        try:
            self.status.ctx_used = self.session.context_tokens()
        except AlpacaChatError as exc:
            self.report(exc)

    # -- sending and streaming -----------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if is_command(text):
            self.prompt.remember(text)
            self.prompt.clear()
            await self.run_command(text)
            return
        if self._busy("send another message") or not self._need_session():
            return
        self.prompt.remember(text)
        self.prompt.clear()
        if self.editing:
            self._end_editing()
            if not await self._rewind():
                return
        await self.start_reply(text[1:] if text.startswith("//") else text)

    async def start_reply(self, text: str, input: str = "") -> None:
        await self.transcript.add_user(f"{text}\n\n{input}" if input else text)
        self._reply_view = await self.transcript.add_reply()
        self._buffer = StreamBuffer()
        self._cancel = threading.Event()
        self.set_state("generating")
        # Start once the new messages are drawn: mounting them is the UI's costliest
        # moment, best not spent racing llama.cpp for the CPU.
        self.call_after_refresh(self._start_generating, text, input)

    def _start_generating(self, text: str, input: str) -> None:
        self._ui_cpu = time.thread_time()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_S)
        self._flush_timer = self.set_timer(FLUSH_MIN_S, self._flush_tick)
        self._generate(text, input, self._buffer, self._cancel)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, text: str, input: str, buffer: StreamBuffer, cancel: threading.Event) -> None:
        worker = get_current_worker()
        reply, error = None, None
        try:
            reply = self.session.send(text, input=input, cancel=cancel)
            buffer.progress = reply.progress
            for delta in reply:
                buffer.append(delta)
                if worker.is_cancelled:
                    cancel.set()
        except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
            error = describe_error(exc)
        self.post_message(ReplyFinished(reply, error))

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        if not self._wait_for_typing(partial(self._finish_reply, message)):
            await self._finish_reply(message)

    async def _finish_reply(self, message: ReplyFinished) -> None:
        self._drop_after_key()  # a batch still waiting for a key press: this final one covers it
        sys.setswitchinterval(self._switch_interval)
        await self._flush()
        view, self._reply_view = self._reply_view, None
        reply = message.reply
        if reply is None:  # refused before it started (e.g. the prompt does not fit)
            await view.remove()
        else:
            stopped = reply.stats is not None and reply.stats.stop_reason == "cancelled"
            view.set_status("error" if message.error else "stopped" if stopped else "complete")
            if reply.stats is not None:
                self.last_stats = reply.stats
                self.status.tokens_per_s = reply.stats.generation_tokens_per_s
                self.status.ctx_used = reply.stats.prompt_tokens + reply.stats.generated_tokens
            if reply.dropped:
                await self.transcript.set_memory_start(self.session.memory_start - self.hidden)
        if message.error:
            self.notify(message.error, title="Error", severity="error", timeout=8, markup=False)
        await self._after_change()
        self.set_state("ready")  # last: whoever waits for "ready" finds the sidebar up to date too
        self.save_session_state()  # the reply is shown: now its KV state, in a worker

    async def _after_change(self) -> None:
        """The saved conversation changed: follow it in the sidebar."""
        if self.store is not None and self.session is not None and self.session.conversation_id is not None:
            try:
                self.conversation = self.store.get_conversation(self.session.conversation_id)
            except AlpacaChatError as exc:
                self.report(exc)
        await self.refresh_sidebar()

    # -- actions on the last exchange ------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self._cancel.set()
        elif self.editing:
            self._end_editing()
            self.prompt.clear()

    async def _rewind(self):
        """Take back the last exchange in the session, the store and the transcript."""
        try:
            user = self.session.rewind()
        except AlpacaChatError as exc:
            self.report(exc)
            return None
        if user is None:
            self.notify("There is no message to take back yet.", severity="warning")
            return None
        await self.transcript.remove_last_exchange()
        return user

    async def action_regenerate(self) -> None:
        if self._busy("regenerate") or not self._need_session():
            return
        user = await self._rewind()
        if user is not None:
            await self.start_reply(user.content, user.input)

    def action_edit_last(self) -> None:
        if self._busy("edit") or not self._need_session():
            return
        last = next((m for m in reversed(self.session.messages) if m.role == "user"), None)
        if last is None:
            self.notify("There is no message to edit yet.", severity="warning")
            return
        self.prompt.load_text(last.flattened_content())
        self.prompt.move_cursor(self.prompt.document.end)
        self.editing = True
        self.prompt.border_title = "editing your last message: Enter sends it again, Esc cancels"
        self.prompt.focus()

    def _end_editing(self) -> None:
        self.editing = False
        self.prompt.border_title = None

    def action_copy_reply(self) -> None:
        reply = self.transcript.last_reply()
        if reply is None or not reply.text:
            self.notify("There is no reply to copy yet.", severity="warning")
            return
        self.copy_to_clipboard(reply.text)  # Textual's copy (OSC 52): works over SSH
        where = "the clipboard" if copy_to_system(reply.text) else "the terminal's clipboard"
        self.notify(f"Copied the last reply to {where}.")

    # -- conversations -------------------------------------------------------

    async def _show_conversation(self, conversation) -> None:
        rows = []
        if conversation is not None and self.store is not None:
            try:
                rows = kept_rows(self.store.messages(conversation.id))
            except AlpacaChatError as exc:
                self.report(exc)
        self.hidden = 0
        await self.transcript.show(rows)
        self.prompt.prompt_history = [r.content for r in rows if r.role == "user"]

    async def open_conversation(self, conversation) -> None:
        if self._busy("switch conversations"):
            return
        self.conversation = conversation
        self._end_editing()
        await self._show_conversation(conversation)
        if self.loaded is not None:
            leaving = self.session
            try:
                self.session = new_session(self.loaded, self.settings, self.store, conversation)
            except AlpacaChatError as exc:
                self.report(exc)
            self.resume_session(leaving if leaving is not self.session else None)
            if conversation is not None and conversation.model and conversation.model != self.loaded.label \
                    and not self.state.startswith("loading"):
                self.load(conversation.model)  # restore the conversation's model
        self.status.tokens_per_s = 0.0
        self.update_context()
        await self.refresh_sidebar()

    async def action_new_conversation(self) -> None:
        if self._busy("start a new conversation"):
            return
        self.conversation = None
        self._end_editing()
        await self._show_conversation(None)
        if self.session is not None:
            self.save_session_state()  # the conversation left behind
            self.session.start_new()
        self.status.tokens_per_s = 0.0
        self.update_context()
        await self.refresh_sidebar()
        self.prompt.focus()

    async def refresh_sidebar(self) -> None:
        if self.store is None or not self.sidebar.display:
            return
        try:
            found = self.store.list_conversations(limit=SIDEBAR_LIMIT, query=self.sidebar.query_text or None)
        except AlpacaChatError as exc:
            self.report(exc)
            return
        await self.sidebar.show(found, self.conversation.id if self.conversation else None)

    async def action_toggle_sidebar(self) -> None:
        if self.store is None:
            self.notify("History is off (--no-history): there are no saved conversations.", severity="warning")
            return
        self.sidebar.display = not self.sidebar.display
        if self.sidebar.display:
            await self.refresh_sidebar()
            self.sidebar.query_one("#conversations").focus()
        else:
            self.prompt.focus()

    async def action_filter(self) -> None:
        if self.store is None:
            return
        if not self.sidebar.display:
            await self.action_toggle_sidebar()
        self.sidebar.query_one("#filter").focus()

    async def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            await self.refresh_sidebar()

    async def on_sidebar_action(self, event: Sidebar.Action) -> None:
        conversation = event.conversation
        if event.action == "open":
            await self.open_conversation(conversation)
            self.prompt.focus()
        elif event.action == "rename":
            self.push_screen(
                TextPromptScreen("Rename the conversation", conversation.title),
                partial(self._rename, conversation),
            )
        elif event.action == "delete":
            title = conversation.title or "(untitled)"
            self.push_screen(
                ConfirmScreen(f"Delete “{title}” and all its messages? This cannot be undone.", yes="Delete"),
                partial(self._delete, conversation),
            )

    async def _rename(self, conversation, title: str | None) -> None:
        if title is None or not title.strip():
            return
        try:
            self.store.rename_conversation(conversation.id, title.strip())
        except AlpacaChatError as exc:
            self.report(exc)
            return
        if self.conversation is not None and self.conversation.id == conversation.id:
            self.conversation = self.store.get_conversation(conversation.id)
        await self.refresh_sidebar()

    async def _delete(self, conversation, confirmed: bool | None) -> None:
        if not confirmed:
            return
        if self.conversation is not None and self.conversation.id == conversation.id:
            if self._busy("delete this conversation"):
                return
            await self.action_new_conversation()
        try:
            self.store.delete_conversation(conversation.id)
        except AlpacaChatError as exc:
            self.report(exc)
        await self.refresh_sidebar()
        self.notify(f"Deleted “{conversation.title or '(untitled)'}”.", markup=False)

    # -- app-wide actions ------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self._cancel.set()
        self.exit(0)
