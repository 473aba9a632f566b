"""Line mode: a prompt-toolkit REPL for dumb terminals, screen readers and slow SSH.

Replies stream as plain text. Ctrl+C during a reply stops it (the partial reply
is kept and saved); Ctrl+C or Ctrl+D at an empty prompt exits.
"""

import sys
import threading

from alpaca_chat import paths
from alpaca_chat.errors import AlpacaChatError, UsageError

HELP = """\
Commands:
  /help              this help
  /new               start a new conversation
  /system TEXT       set the system prompt (empty TEXT clears it)
  /set NAME VALUE    sampling: temp, top_p, top_k, min_p, repeat_penalty, seed, max_tokens
  /stats             stats of the last reply
  /clear             clear the screen
  /exit              quit (or Ctrl+D)
Enter sends; Esc then Enter (or Alt+Enter) inserts a newline."""

SET_NAMES = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_p": ("top_p", float), "top-p": ("top_p", float),
    "top_k": ("top_k", int), "top-k": ("top_k", int),
    "min_p": ("min_p", float), "min-p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float), "repeat-penalty": ("repeat_penalty", float),
    "seed": ("seed", int), "max_tokens": ("max_tokens", int), "max-tokens": ("max_tokens", int),
}


def parse_set(args: str) -> dict:
    """'/set temp 0.7' -> {'temperature': 0.7}; UsageError on anything else."""
    parts = args.split()
    if len(parts) != 2 or parts[0].lower() not in SET_NAMES:
        raise UsageError(f"usage: /set NAME VALUE, NAME one of {', '.join(sorted(set(SET_NAMES)))}")
    name, kind = SET_NAMES[parts[0].lower()]
    try:
        return {name: kind(parts[1])}
    except ValueError:
        raise UsageError(f"/set {parts[0]}: {parts[1]!r} is not a valid {kind.__name__}") from None


class LineChat:
    def __init__(self, session, output=sys.stdout):
        self.session = session
        self.out = output
        self.last_stats = None

    def handle_command(self, line: str) -> bool:
        """Run a slash command; return False when the user asked to quit."""
        name, _, args = line[1:].partition(" ")
        name = name.lower()
        if name in ("exit", "quit", "q"):
            return False
        if name == "help":
            self._say(HELP)
        elif name == "new":
            self.session.start_new()
            self._say("(new conversation)")
        elif name == "system":
            self.session.set_system_prompt(args.strip() or None)
            self._say("(system prompt set)" if args.strip() else "(system prompt cleared)")
        elif name == "set":
            self.session.sampling = self.session.sampling.with_changes(**parse_set(args))
            self._say(f"({', '.join(f'{k}={v}' for k, v in self.session.sampling.to_dict().items())})")
        elif name == "stats":
            from alpaca_chat.cli import format_stats

            self._say(format_stats(self.last_stats) if self.last_stats else "(no reply yet)")
        elif name == "clear":
            self.out.write("\033[2J\033[H")
        else:
            raise UsageError(f"unknown command /{name} (try /help)")
        return True

    def reply_to(self, text: str) -> None:
        cancel = threading.Event()
        reply = self.session.send(text, cancel=cancel)
        try:
            for delta in reply:
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            reply.deltas.close()
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.last_stats = reply.stats
        if reply.dropped:
            self._say(f"({len(reply.dropped)} old message(s) no longer fit the context; the model forgot them)")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def run(session) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history_file = paths.data_dir() / "input_history"
    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(history_file)))
    chat = LineChat(session)
    chat._say(f"alpaca-chat line mode · {session.model_label} · /help for commands, Ctrl+D to quit")
    while True:
        try:
            line = prompt.prompt(">>> ")
        except (EOFError, KeyboardInterrupt):
            return 0
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not chat.handle_command(line.strip()):
                    return 0
            else:
                chat.reply_to(line)
        except AlpacaChatError as exc:
            chat._say(f"error: {exc}")
