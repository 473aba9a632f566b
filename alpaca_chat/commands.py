"""Slash commands shared by the full-screen app and the line mode. Pure: no I/O.

The names, their arguments and their help live here, once, and so does the
dispatch: each front end supplies an object with one handler method per
command (`CommandHandlers`) and runs lines through a `CommandDispatcher`,
which refuses, when it is built, an object that lacks a handler.
"""

from dataclasses import dataclass
from typing import Protocol

from alpaca_chat.errors import UsageError


@dataclass(frozen=True)
class Command:
    name: str
    args: str  # how the arguments read in the help, "" for none
    help: str


COMMANDS = (
    Command("help", "", "this help"),
    Command("new", "", "start a new conversation"),
    Command("system", "TEXT", "set the system prompt (no TEXT clears it)"),
    Command("set", "NAME VALUE", "sampling: temp, top_p, top_k, min_p, repeat_penalty, seed, max_tokens"),
    Command("model", "NAME_OR_PATH", "switch to another model, keeping the conversation"),
    Command("lora", "[add|off|on|scale ...]",
            "LoRA adapters: list; add FILE[:SCALE], off NAME|all, on NAME|all, scale NAME X (model stays loaded)"),
    Command("stats", "", "timings of the last reply"),
    Command("clear", "", "clear the screen (the conversation is kept)"),
    Command("export", "[PATH]", "save the conversation as Markdown (.json: as JSON)"),
    Command("exit", "", "quit"),
)
_BY_NAME = {c.name: c for c in COMMANDS}
_ALIASES = {"quit": "exit", "q": "exit", "?": "help"}

SET_NAMES = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_p": ("top_p", float), "top-p": ("top_p", float),
    "top_k": ("top_k", int), "top-k": ("top_k", int),
    "min_p": ("min_p", float), "min-p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float), "repeat-penalty": ("repeat_penalty", float),
    "seed": ("seed", int), "max_tokens": ("max_tokens", int), "max-tokens": ("max_tokens", int),
}


def is_command(line: str) -> bool:
    """A line starting with '/' is a command; '//' escapes a message that starts with '/'."""
    return line.startswith("/") and not line.startswith("//")


def parse_command(line: str) -> tuple[str, str]:
    """'/set temp 0.7' -> ('set', 'temp 0.7'); UsageError for an unknown command."""
    name, _, args = line.strip()[1:].partition(" ")
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in _BY_NAME:
        raise UsageError(f"unknown command /{name} (try /help)")
    return name, args.strip()


class CommandHandlers(Protocol):
    """One method per command in COMMANDS, named after it, given the text after the name.

    The app's handlers are coroutines; line mode's `exit` returns False. The
    dispatcher hands back whatever a handler returns.
    """

    def help(self, args: str): ...

    def new(self, args: str): ...

    def system(self, args: str): ...

    def set(self, args: str): ...

    def model(self, args: str): ...

    def lora(self, args: str): ...

    def stats(self, args: str): ...

    def clear(self, args: str): ...

    def export(self, args: str): ...

    def exit(self, args: str): ...


def missing_handlers(handlers) -> list[str]:
    """The commands in COMMANDS that `handlers` (a class or an object) has no method for."""
    return [c.name for c in COMMANDS if not callable(getattr(handlers, c.name, None))]


def _refuse_missing(handlers, what: str) -> None:
    missing = missing_handlers(handlers)
    if missing:
        raise TypeError(f"{what} has no handler for {', '.join('/' + name for name in missing)}")


def handles_commands(cls):
    """Class decorator for a front end's handlers: one that misses a command fails on import."""
    _refuse_missing(cls, cls.__qualname__)
    return cls


class CommandDispatcher:
    """Runs a command line through the handler of its command."""

    def __init__(self, handlers: CommandHandlers):
        _refuse_missing(handlers, type(handlers).__qualname__)
        self._handlers = {c.name: getattr(handlers, c.name) for c in COMMANDS}

    def __call__(self, line: str):
        """Parse `line` and run its command's handler; UsageError for an unknown command."""
        name, args = parse_command(line)
        return self._handlers[name](args)


_refuse_missing(CommandHandlers, "CommandHandlers")  # the protocol itself names every command


def parse_set(args: str) -> dict:
    """'temp 0.7' -> {'temperature': 0.7}; UsageError on anything else."""
    parts = args.split()
    if len(parts) != 2 or parts[0].lower() not in SET_NAMES:
        raise UsageError(f"usage: /set NAME VALUE, NAME one of {', '.join(sorted(set(SET_NAMES)))}")
    name, kind = SET_NAMES[parts[0].lower()]
    try:
        return {name: kind(parts[1])}
    except ValueError:
        raise UsageError(f"/set {parts[0]}: {parts[1]!r} is not a valid {kind.__name__}") from None


def command_lines() -> list[tuple[str, str]]:
    """(usage, help) for every command, for help screens."""
    return [(f"/{c.name} {c.args}".rstrip(), c.help) for c in COMMANDS]


def format_sampling(sampling) -> str:
    return ", ".join(f"{k}={v}" for k, v in sampling.to_dict().items())


def format_stats(stats, adapters=()) -> str:
    """One line describing a reply's GenerationStats (and the LoRA adapters on, if any)."""
    from alpaca_chat.lora_spec import format_adapters

    lora = f" | LoRA: {format_adapters(adapters)}" if adapters else ""
    return (
        f"prompt: {stats.prompt_tokens} tokens ({stats.cached_tokens} cached), "
        f"{stats.prompt_tokens_per_s:.1f} tok/s | "
        f"reply: {stats.generated_tokens} tokens, {stats.generation_tokens_per_s:.1f} tok/s | "
        f"first token: {stats.time_to_first_token_s * 1000:.0f} ms | stop: {stats.stop_reason}{lora}"
    )
