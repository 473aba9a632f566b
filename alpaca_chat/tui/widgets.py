"""The chat screen's widgets: transcript, messages, prompt input, status bar, sidebar.

Widgets only display and report: they post messages up to the app, which owns
the session, the store and the workers.
"""

import threading

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Input, Label, ListItem, ListView, Markdown, Static, TextArea

# Markers shown in a reply's header for replies that did not complete.
STATUS_NOTES = {"streaming": "…", "stopped": "stopped", "partial": "incomplete", "error": "error"}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SPINNER_INTERVAL_S = 0.25


class StreamBuffer:
    """Text deltas handed from the generation thread to the UI, which drains them on a timer.

    Appending is all the worker does per token: no message, no widget, no render.
    """

    def __init__(self):
        self._parts: list[str] = []
        self._lock = threading.Lock()
        self.progress = None  # the reply's live GenerationStats, once it has started

    def append(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)

    def drain(self) -> str:
        with self._lock:
            parts, self._parts = self._parts, []
        return "".join(parts)


class UserMessage(Static):
    """A message the user sent, shown as typed (no markup)."""

    def __init__(self, text: str):
        super().__init__(Text(text))
        self.text = text
        self.border_title = "you"


class AssistantMessage(Vertical):
    """A reply: Markdown (code blocks highlighted), streamed in batches the app times."""

    def __init__(self, text: str = "", status: str = "complete"):
        super().__init__()
        self.text = text
        self._markdown = Markdown(text)
        self.set_status(status)

    def compose(self):
        yield self._markdown

    def set_status(self, status: str) -> None:
        self.status = status
        note = STATUS_NOTES.get(status)
        self.border_title = "assistant" + (f" · {note}" if note else "")
        self.set_class(status in ("stopped", "partial"), "-stopped")
        self.set_class(status == "error", "-error")

    async def write(self, text: str) -> None:
        """Append streamed text: Markdown.append re-parses only from the last block on."""
        self.text += text
        await self._markdown.append(text)


class MemoryDivider(Static):
    """Where the model's memory starts: older messages no longer fit the context."""

    def __init__(self):
        super().__init__("▲ older messages no longer fit the context: the model's memory starts here ▼")


class Transcript(VerticalScroll):
    """The conversation. Anchored: it follows the bottom unless the user scrolls up."""

    EMPTY_HINT = "Type a message and press Enter.  F1: help · Ctrl+B: conversations · Ctrl+P: commands"

    def compose(self):
        yield Static(self.EMPTY_HINT, id="empty-hint")

    def on_mount(self) -> None:
        self.anchor()

    @property
    def messages(self) -> list[Widget]:
        return [w for w in self.children if isinstance(w, (UserMessage, AssistantMessage))]

    def last_reply(self) -> "AssistantMessage | None":
        replies = [w for w in self.messages if isinstance(w, AssistantMessage)]
        return replies[-1] if replies else None

    async def show(self, rows) -> None:
        """Replace the transcript with saved rows (objects with role, content, status)."""
        await self.remove_children([w for w in self.children if w.id != "empty-hint"])
        widgets = [
            UserMessage(row.content) if row.role == "user" else AssistantMessage(row.content, row.status)
            for row in rows
        ]
        await self.mount_all(widgets)
        self._update_hint()
        self.anchor()

    async def clear(self) -> None:
        await self.show([])

    async def add_user(self, text: str) -> UserMessage:
        widget = UserMessage(text)
        await self.mount(widget)
        self._update_hint()
        return widget

    async def add_reply(self) -> AssistantMessage:
        widget = AssistantMessage(status="streaming")
        await self.mount(widget)
        self._update_hint()
        self.anchor()
        return widget

    async def remove_last_exchange(self) -> None:
        """Remove the last user message and everything shown after it."""
        children = list(self.children)
        users = [i for i, w in enumerate(children) if isinstance(w, UserMessage)]
        if users:
            await self.remove_children(children[users[-1]:])
        self._update_hint()

    async def set_memory_start(self, index: int) -> None:
        """Put the divider before the message at `index` (0: no divider)."""
        await self.remove_children(list(self.query(MemoryDivider)))
        messages = self.messages
        if 0 < index < len(messages):
            await self.mount(MemoryDivider(), before=messages[index])

    def _update_hint(self) -> None:
        self.query_one("#empty-hint").display = not self.messages


class PromptInput(TextArea):
    """The message box. Enter sends; Shift+Enter or Ctrl+J inserts a newline;
    Up on an empty box recalls earlier prompts (Down goes back)."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.cursor_blink = False
        self.prompt_history: list[str] = []
        self._recalling: int | None = None
        self.editing = False  # the box holds the last message, to send again

    def start_editing(self, text: str) -> None:
        self.load_text(text)
        self.move_cursor(self.document.end)
        self.editing = True
        self.border_title = "editing your last message: Enter sends it again, Esc cancels"
        self.focus()

    def end_editing(self) -> None:
        self.editing = False
        self.border_title = None

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.prompt_history and self._can_recall():
            index = len(self.prompt_history) if self._recalling is None else self._recalling
            if index > 0:
                self._show_recalled(index - 1)
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self._recalling is not None and self.text == self.prompt_history[self._recalling]:
            if self._recalling + 1 < len(self.prompt_history):
                self._show_recalled(self._recalling + 1)
            else:
                self._recalling = None
                self.clear()
            return
        super().action_cursor_down(select)

    def remember(self, text: str) -> None:
        if not self.prompt_history or self.prompt_history[-1] != text:
            self.prompt_history.append(text)
        self._recalling = None

    def _can_recall(self) -> bool:
        if not self.text:
            return True
        return self._recalling is not None and self.text == self.prompt_history[self._recalling]

    def _show_recalled(self, index: int) -> None:
        self._recalling = index
        self.load_text(self.prompt_history[index])
        self.move_cursor(self.document.end)


class StatusBar(Static):
    """Model · LoRA adapters · context used/total · speed of the last reply · state (turning while a model loads)."""

    model = reactive("")
    adapters = reactive("")  # the LoRA adapters on, e.g. "mine, style×0.5"
    ctx_used = reactive(0)
    ctx_total = reactive(0)
    tokens_per_s = reactive(0.0)
    state = reactive("starting")
    spin = reactive(0)
    note = reactive("")  # e.g. "restored 2,000 tokens": shown while ready, gone once a reply starts

    _spinner: Timer | None = None

    def watch_state(self, state: str) -> None:
        if state == "generating":
            self.note = ""
        loading = state.startswith("loading")  # while generating, the streamed batches turn it
        if loading and self._spinner is None:
            self._spinner = self.set_interval(SPINNER_INTERVAL_S, self._turn)
        elif not loading and self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def _turn(self) -> None:
        self.spin += 1

    def render(self) -> Text:
        state = self.state
        if state.startswith("loading") or state == "generating":  # turns as loading ticks, or text arrives
            state = f"{SPINNER[self.spin % len(SPINNER)]} {state}"
        if state.endswith("generating"):
            state += " (Esc stops)"
        parts = [self.model or "no model"]
        if self.adapters:
            parts.append(f"LoRA {self.adapters}")
        if self.ctx_total:
            parts.append(f"ctx {self.ctx_used}/{self.ctx_total}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        parts.append(f"{state} · {self.note}" if self.note and state == "ready" else state)
        return Text(" " + " │ ".join(parts))


class ConversationItem(ListItem):
    def __init__(self, conversation):
        super().__init__(Label(Text(conversation.title or "(untitled)"), markup=False))
        self.conversation = conversation


class Sidebar(Vertical):
    """Saved conversations, newest first, with a filter box. It asks the app to show, open,
    rename or delete them with Sidebar.Action ("filter": the filter text changed)."""

    BINDINGS = [
        Binding("f2", "rename", "Rename"),
        Binding("delete", "delete", "Delete"),
    ]

    class Action(Message):
        """The user asked to open, rename or delete a conversation, or changed the filter."""

        def __init__(self, action: str, conversation):
            super().__init__()
            self.action = action
            self.conversation = conversation

    def compose(self):
        yield Input(placeholder="filter conversations", id="filter")
        yield ListView(id="conversations")

    async def show(self, conversations, current_id: int | None) -> None:
        listing = self.query_one(ListView)
        await listing.clear()
        items = [ConversationItem(c) for c in conversations]
        await listing.extend(items)
        current = [i for i, item in enumerate(items) if item.conversation.id == current_id]
        listing.index = current[0] if current else (0 if items else None)

    @property
    def query_text(self) -> str:
        return self.query_one("#filter", Input).value.strip()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.Action("filter", None))

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        self.post_message(self.Action("open", event.item.conversation))

    def _highlighted(self):
        item = self.query_one(ListView).highlighted_child
        return item.conversation if isinstance(item, ConversationItem) else None

    def action_rename(self) -> None:
        if (conversation := self._highlighted()) is not None:
            self.post_message(self.Action("rename", conversation))

    def action_delete(self) -> None:
        if (conversation := self._highlighted()) is not None:
            self.post_message(self.Action("delete", conversation))
