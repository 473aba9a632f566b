"""Line mode: a prompt-toolkit REPL for dumb terminals, screen readers and slow SSH.

Replies stream as plain text. Ctrl+C during a reply stops it (the partial reply
is kept and saved); Ctrl+C or Ctrl+D at the prompt exits.
"""

import io
import sys
import threading
from contextlib import contextmanager

from alpaca_chat import paths
from alpaca_chat.commands import (CommandDispatcher, command_lines, format_sampling, format_stats, handles_commands,
                                  is_command, parse_set)
from alpaca_chat.errors import AlpacaChatError, UsageError
from alpaca_chat.lora_spec import format_adapters, format_lora_list, plan_lora

HELP = (
    "Commands:\n"
    + "\n".join(f"  {usage:<20} {text}" for usage, text in command_lines())
    + "\nEnter sends; Esc then Enter (or Alt+Enter) inserts a newline. Start a message with // to send a leading /."
    + "\nCtrl+C stops a reply; Ctrl+C or Ctrl+D at the prompt quits."
)


@handles_commands
class LineChat:
    """One line-mode chat: its commands (one handler per command, `CommandHandlers`) and its replies;
    `run` adds the prompt."""

    def __init__(self, session, output=sys.stdout, *, load_model=None):
        self.session = session
        self.out = output
        self.last_stats = None
        # (spec) -> LoadedModel, for /model; None: /model is not available.
        self.load_model = load_model
        self._dispatch = CommandDispatcher(self)

    def handle_command(self, line: str) -> bool:
        """Run a slash command; return False when the user asked to quit."""
        return self._dispatch(line) is not False

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
            self.say(f"({len(reply.dropped)} old message(s) no longer fit the context; the model forgot them)")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # -- the commands --------------------------------------------------------

    def help(self, args: str) -> None:
        self.say(HELP)

    def new(self, args: str) -> None:
        self.session.start_new()
        self.say("(new conversation)")

    def system(self, args: str) -> None:
        self.session.set_system_prompt(args or None)
        self._save_settings()
        self.say("(system prompt set)" if args else "(system prompt cleared)")

    def set(self, args: str) -> None:
        self.session.sampling = self.session.sampling.with_changes(**parse_set(args))
        self._save_settings()
        self.say(f"({format_sampling(self.session.sampling)})")

    def model(self, spec: str) -> None:
        if not spec:
            raise UsageError("usage: /model NAME_OR_PATH")
        if self.load_model is None:
            raise UsageError("/model is not available here")
        self.say(f"(loading {spec}...)")
        loaded = self.load_model(spec)
        old = self.session.engine
        self.session.switch_model(loaded.engine, loaded.template, loaded.label)
        if old is not loaded.engine and hasattr(old, "close"):
            old.close()
        self.say(f"(now chatting with {loaded.display_name})")

    def lora(self, args: str) -> None:
        session = self.session
        plan = plan_lora(args, session.engine.adapters, session.adapters_off)
        if plan is None:
            self.say(format_lora_list(session.engine.adapters, session.adapters_off))
            return
        session.set_adapters(plan.active)  # a bad adapter raises: the previous set stays
        session.adapters_off = plan.off
        self.say(f"({plan.message})")

    def stats(self, args: str) -> None:
        adapters = getattr(self.session.engine, "adapters", ())
        self.say(format_stats(self.last_stats, adapters) if self.last_stats else "(no reply yet)")

    def clear(self, args: str) -> None:
        self.out.write("\033[2J\033[H")
        self.out.flush()

    def export(self, path: str) -> None:
        from alpaca_chat.export import export_conversation

        if self.session.store is None or self.session.conversation_id is None:
            raise UsageError("nothing to export yet (or history is off)")
        written = export_conversation(self.session.store, self.session.conversation_id, path or None)
        self.say(f"(saved to {written})")

    def exit(self, args: str) -> bool:
        return False

    def _save_settings(self) -> None:
        save = getattr(self.session, "save_settings", None)
        if save is not None:
            save()


def run(session, *, load_model=None) -> int:
    """Chat line by line: typed at a prompt-toolkit prompt, or read from a pipe.

    From a pipe (`printf 'hi\n/stats\n' | alpaca-chat`) every line is a
    message or a command, and stdout carries only the replies and what the
    commands print.
    """
    chat = LineChat(session, load_model=load_model)
    interactive = sys.stdin.isatty()
    if interactive:
        adapters = format_adapters(getattr(session.engine, "adapters", ()))
        chat.say(f"alpaca-chat line mode · {session.model_label}{' + LoRA ' + adapters if adapters else ''}"
                 " · /help for commands, Ctrl+D to quit")
        for message in session.messages:
            if message.role != "system":
                chat.say(f"{'>>> ' if message.role == 'user' else ''}{message.content}")
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
                chat.say(f"error: {exc}")
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
