"""Modal screens: help, a yes/no confirmation, and a one-line text prompt."""

from rich.table import Table
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from alpaca_chat.commands import command_lines

KEYS = (
    ("Enter", "send"),
    ("Shift+Enter, Ctrl+J", "new line"),
    ("Up / Down (empty box)", "earlier prompts"),
    ("Esc", "stop the reply (what came is kept)"),
    ("Ctrl+R", "regenerate the last reply"),
    ("Ctrl+E", "edit the last message and send it again"),
    ("Ctrl+O", "copy the last reply"),
    ("Ctrl+N", "new conversation"),
    ("Ctrl+B", "show / hide saved conversations"),
    ("F2 / Delete", "rename / delete the highlighted conversation"),
    ("Ctrl+F", "filter conversations"),
    ("Ctrl+P", "command palette"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
)


def help_table(title: str, rows) -> Table:
    table = Table.grid(padding=(0, 2))
    table.title = title
    table.title_style = "bold"
    table.title_justify = "left"
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for left, right in rows:
        table.add_row(left, right)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self):
        with VerticalScroll(id="help-dialog", classes="dialog"):
            yield Static(help_table("Keys", KEYS))
            yield Static(help_table("Commands (type them in the message box)", command_lines()), classes="help-commands")
            yield Label("Start a message with // to send one that begins with /.  Esc closes this help.",
                        classes="dialog-hint")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "answer(False)", "No"), Binding("y", "answer(True)", "Yes")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class TextPromptScreen(ModalScreen[str | None]):
    """Ask for one line of text; Enter accepts, Esc cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = ""):
        super().__init__()
        self.title_text, self.value, self.placeholder = title, value, placeholder

    def compose(self):
        with Vertical(classes="dialog"):
            yield Label(self.title_text, markup=False)
            yield Input(self.value, placeholder=self.placeholder)
            yield Label("Enter accepts · Esc cancels", classes="dialog-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
