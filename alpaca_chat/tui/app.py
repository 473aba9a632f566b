"""The full-screen chat app: widgets, workers and messages wired together.

Two kinds of thread workers: one loads a model (posting ModelLoaded or
ModelFailed), one streams a reply (the ReplyStream widget's). Workers never
touch a widget: a reply's text goes into a StreamBuffer that a UI timer drains
into the reply's Markdown, and everything else comes back as messages. The
app's own methods route key bindings, messages and commands to the objects
that do the work: the ConversationController (the conversation, its session
and model), the SidebarController (the saved conversations), TuiCommands (the
slash commands and the palette) and the ReplyStream.
"""

import gc
from collections.abc import Callable
from functools import partial

from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer

from alpaca_chat.commands import is_command
from alpaca_chat.config import Settings
from alpaca_chat.loading import LoadedModel, load_model
from alpaca_chat.tui.clipboard import copy_to_system
from alpaca_chat.tui.commands import TuiCommands
from alpaca_chat.tui.conversations import ConversationController
from alpaca_chat.tui.messages import ModelFailed, ModelLoaded, StateRestored, describe_error, load_in_worker
from alpaca_chat.tui.screens import HelpScreen
from alpaca_chat.tui.sidebar import SidebarController
from alpaca_chat.tui.streaming import ReplyStream
from alpaca_chat.tui.widgets import PromptInput, Sidebar, StatusBar, Transcript


class ChatApp(App[int]):
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
        self.loader = loader or (lambda spec: load_model(spec, settings, verbose=verbose))
        self.model_spec = settings.model or (saved.model if saved else None)
        self.state = "starting"
        self.last_stats = None
        self.chats = ConversationController(self, settings, store, saved)
        self.sidebar_ctl = SidebarController(self, store)
        self.commands = TuiCommands(self)

    def compose(self):
        self.sidebar = Sidebar(id="sidebar")
        self.transcript = Transcript(id="transcript")
        self.prompt = PromptInput(id="prompt")
        self.status = StatusBar(id="status")
        self.stream = ReplyStream(self.status)
        with Horizontal(id="main"):
            yield self.sidebar
            with Vertical(id="chat"):
                yield self.transcript
                yield self.prompt
        yield self.status
        yield self.stream
        yield Footer()

    async def on_mount(self) -> None:
        self.sidebar.display = False
        self.prompt.focus()
        if self.store is not None and self.store.recovered_from is not None:
            self.notify(f"The history database was corrupt; it was moved to {self.store.recovered_from}",
                        severity="warning", timeout=10, markup=False)
        await self.chats.show(self.chats.conversation)
        self.load(self.model_spec)

    def on_unmount(self) -> None:
        self.stream.stop()

    # -- state -----------------------------------------------------------------

    @property
    def session(self):
        """The session of the conversation on screen (None until a model is loaded)."""
        return self.chats.session

    @property
    def editing(self) -> bool:
        """The message box holds the last message, to send again."""
        return self.prompt.editing

    def set_state(self, state: str) -> None:
        self.state = state
        self.status.state = state

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return self.state == "generating" or self.prompt.editing
        if action in ("regenerate", "edit_last", "copy_reply", "new_conversation", "toggle_sidebar", "filter"):
            # Only on the chat screen, not over a dialog.
            return self.screen is self.screen_stack[0]
        return True

    def report(self, exc: BaseException) -> None:
        self.notify(describe_error(exc), title="Error", severity="error", timeout=8, markup=False)

    # -- the model ---------------------------------------------------------------

    def load(self, spec: str | None) -> None:
        """Load a model in a worker; ModelLoaded or ModelFailed follows."""
        self.set_state(f"loading {spec or 'the default model'}")
        self.run_worker(partial(load_in_worker, self.loader, spec, self.post_message),
                        thread=True, exclusive=True, group="model", exit_on_error=False)

    def on_model_loaded(self, message: ModelLoaded) -> None:
        first = self.chats.loaded is None
        self.chats.model_loaded(message.loaded)
        if first:
            # What is alive now (modules, widgets, the model's objects) lasts as long as the
            # app. Take it out of the collector's full passes: with it they take tens of ms,
            # a pause in the middle of a streaming reply.
            gc.freeze()
        self.set_state("ready")
        self.chats.update_context()
        self.chats.resume()  # the conversation's saved KV state, in a worker

    def on_model_failed(self, message: ModelFailed) -> None:
        self.notify(f"Could not load {message.spec or 'the default model'}: {message.error}",
                    title="Model", severity="error", timeout=10, markup=False)
        self.set_state("ready" if self.chats.session is not None else "no model")

    # -- messages from the widgets and workers -----------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if is_command(event.text):
            self.prompt.remember(event.text)
            self.prompt.clear()
            await self.commands.run(event.text)
        else:
            await self.chats.submit(event.text)

    def on_text_area_changed(self) -> None:
        self.stream.typed(self.prompt.text)

    async def on_reply_stream_finished(self, message: ReplyStream.Finished) -> None:
        reply = message.reply
        if reply is not None and reply.stats is not None:
            self.last_stats = reply.stats
            self.status.tokens_per_s = reply.stats.generation_tokens_per_s
            self.status.ctx_used = reply.stats.prompt_tokens + reply.stats.generated_tokens
        if reply is not None and reply.dropped:
            await self.chats.show_memory_start()
        if message.error:
            self.notify(message.error, title="Error", severity="error", timeout=8, markup=False)
        await self.chats.changed()
        self.set_state("ready")  # last: whoever waits for "ready" finds the sidebar up to date too
        self.save_session_state()  # the reply is shown: now its KV state, in a worker

    def save_session_state(self) -> None:
        """Save the current conversation's KV state, in a worker."""
        self.chats.save_state()

    def on_state_restored(self, message: StateRestored) -> None:
        if message.session is self.chats.session:
            self.status.note = f"restored {message.tokens:,} tokens"

    async def on_sidebar_action(self, event: Sidebar.Action) -> None:
        await self.sidebar_ctl.act(event.action, event.conversation)

    async def open_conversation(self, conversation) -> None:
        await self.chats.open(conversation)

    # -- actions (key bindings, the palette) ---------------------------------------

    def action_stop(self) -> None:
        if self.state == "generating":
            self.stream.stop()
        elif self.prompt.editing:
            self.prompt.end_editing()
            self.prompt.clear()

    async def action_regenerate(self) -> None:
        await self.chats.regenerate()

    def action_edit_last(self) -> None:
        self.chats.edit_last()

    def action_copy_reply(self) -> None:
        reply = self.transcript.last_reply()
        if reply is None or not reply.text:
            self.notify("There is no reply to copy yet.", severity="warning")
            return
        self.copy_to_clipboard(reply.text)  # Textual's copy (OSC 52): works over SSH
        where = "the clipboard" if copy_to_system(reply.text) else "the terminal's clipboard"
        self.notify(f"Copied the last reply to {where}.")

    async def action_new_conversation(self) -> None:
        await self.chats.new()

    async def action_toggle_sidebar(self) -> None:
        await self.sidebar_ctl.toggle()

    async def action_filter(self) -> None:
        await self.sidebar_ctl.focus_filter()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        self.stream.stop()
        self.exit(0)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield from self.commands.palette()
