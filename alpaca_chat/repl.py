"""Line mode: a prompt-toolkit REPL for dumb terminals, screen readers and slow SSH.

Replies stream as plain text. Ctrl+C during a reply stops it (the partial reply
is kept and saved); Ctrl+C or Ctrl+D at the prompt exits.
"""

import io
import sys
import threading
from contextlib import contextmanager

from alpaca_chat import paths
from alpaca_chat.commands import command_lines, format_sampling, format_stats, is_command, parse_command
from alpaca_chat.commands import parse_set  # noqa: F401 - re-exported: `/set` parsing lives in commands
from alpaca_chat.errors import AlpacaChatError, UsageError

HELP = (
    "Commands:\n"
    + "\n".join(f"  {usage:<20} {text}" for usage, text in command_lines())
    + "\nEnter sends; Esc then Enter (or Alt+Enter) inserts a newline. Start a message with // to send a leading /."
    + "\nCtrl+C stops a reply; Ctrl+C or Ctrl+D at the prompt quits."
)


class LineChat:
    """The commands and the streaming of one line-mode chat; `run` adds the prompt."""

    def __init__(self, session, output=sys.stdout, *, load_model=None):
        self.session = session
        self.out = output
        self.last_stats = None
        # (spec) -> LoadedModel, for /model; None: /model is not available.
        self.load_model = load_model

    def handle_command(self, line: str) -> bool:
        """Run a slash command; return False when the user asked to quit."""
        name, args = parse_command(line)
        if name == "exit":
            return False
        if name == "help":
            self._say(HELP)
        elif name == "new":
            self.session.start_new()
            self._say("(new conversation)")
        elif name == "system":
            self.session.set_system_prompt(args or None)
            self._save_settings()
            self._say("(system prompt set)" if args else "(system prompt cleared)")
        elif name == "set":
            self.session.sampling = self.session.sampling.with_changes(**parse_set(args))
            self._save_settings()
            self._say(f"({format_sampling(self.session.sampling)})")
        elif name == "model":
            self._switch_model(args)
        elif name == "stats":
            self._say(format_stats(self.last_stats) if self.last_stats else "(no reply yet)")
        elif name == "export":
            self._export(args)
        elif name == "clear":
            self.out.write("\033[2J\033[H")
            self.out.flush()
        return True

    def reply_to(self, text: str) -> None:
        cancel = threading.Event()
        reply = self.session.send(text, cancel=cancel)
        try:
            with _typing_not_echoed(sys.stdin):
                for delta in reply:
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            reply.deltas.close()  # saves the partial reply, marked stopped
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        self.last_stats = reply.stats
        save_state = getattr(self.session, "save_state", None)
        if save_state is not None:
            # Instant resume: after the reply is shown, never before. The file is written by a
            # thread while the user types; run() waits for it before returning.
            save_state(wait=False)
        if reply.dropped:
            self._say(f"({len(reply.dropped)} old message(s) no longer fit the context; the model forgot them)")

    def _switch_model(self, spec: str) -> None:
        if not spec:
            raise UsageError("usage: /model NAME_OR_PATH")
        if self.load_model is None:
            raise UsageError("/model is not available here")
        self._say(f"(loading {spec}...)")
        loaded = self.load_model(spec)
        old = self.session.engine
        self.session.switch_model(loaded.engine, loaded.template, loaded.label)
        if old is not loaded.engine and hasattr(old, "close"):
            old.close()
        self._say(f"(now chatting with {loaded.display_name})")

    def _export(self, path: str) -> None:
        from alpaca_chat.export import export_conversation

        if self.session.store is None or self.session.conversation_id is None:
            raise UsageError("nothing to export yet (or history is off)")
        written = export_conversation(self.session.store, self.session.conversation_id, path or None)
        self._say(f"(saved to {written})")

    def _save_settings(self) -> None:
        save = getattr(self.session, "save_settings", None)
        if save is not None:
            save()

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def run(session, *, load_model=None) -> int:
    """Chat line by line: typed at a prompt-toolkit prompt, or read from a pipe.

    From a pipe (`printf 'hi\n/stats\n' | alpaca-chat`) every line is a
    message or a command, and stdout carries only the replies and what the
    commands print.
    """
    chat = LineChat(session, load_model=load_model)
    interactive = sys.stdin.isatty()
    if interactive:
        chat._say(f"alpaca-chat line mode · {session.model_label} · /help for commands, Ctrl+D to quit")
        for message in session.messages:
            if message.role != "system":
                chat._say(f"{'>>> ' if message.role == 'user' else ''}{message.content}")
    try:
        for line in _prompted_lines() if interactive else _piped_lines():
            if not line.strip():
                continue
            try:
                if is_command(line):
                    if not chat.handle_command(line.strip()):
                        return 0
                else:
                    chat.reply_to(line[1:] if line.startswith("//") else line)
            except AlpacaChatError as exc:
                chat._say(f"error: {exc}")
        return 0
    finally:
        finish_saving = getattr(chat.session, "finish_saving", None)
        if finish_saving is not None:
            finish_saving()  # the last KV state is whole on disk before the process exits


@contextmanager
def _typing_not_echoed(stream):
    """While a reply streams, keys typed ahead are not echoed into it (the next prompt gets them)."""
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, io.UnsupportedOperation, termios.error):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] = saved[3] & ~termios.ECHO  # lflags; Ctrl+C still interrupts (ISIG stays)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _prompted_lines():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history_file = paths.data_dir() / "input_history"
    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(history_file)), key_bindings=_newline_keys())
    while True:
        try:
            yield prompt.prompt(">>> ")
        except (EOFError, KeyboardInterrupt):
            return


def _newline_keys():
    """Esc then Enter, and Alt+Enter (which terminals send as the same two bytes), insert a newline."""
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    return keys


def _piped_lines():
    for line in sys.stdin:
        yield line.rstrip("\n")
