"""`alpaca-convert`: Hugging Face checkpoint -> GGUF -> quantized, and the tools around it.

    alpaca-convert CHECKPOINT --quant Q4_K_M [Q8_0 ...] [-o OUT.gguf] [--keep-f16]
    alpaca-convert export CHECKPOINT --outtype f16 -o OUT.gguf
    alpaca-convert quantize IN.gguf --type Q4_K_M -o OUT.gguf
    alpaca-convert eval QUANT.gguf --reference F16.gguf [--text FILE]
    alpaca-convert eval F16.gguf --ladder Q8_0,Q5_K_M,Q4_K_M [--plot ladder.png]
    alpaca-convert inspect FILE.gguf
    alpaca-convert generate --teacher MODEL --seed-tasks alpaca-seed -n N -o OUT.json

This module parses and dispatches; it is the only place that turns errors into
exit codes: 0 success, 1 failure, 2 usage error or missing package, 130
interrupted. Errors are one line on stderr (a traceback with --debug). The
commands live in `convert.commands` (the converter's own) and
`convert.training_commands` (fine-tuning), each adding its parsers through a
`register`. Before a command runs, `convert.extras` checks that the packages it
needs are installed; `--help` shows which commands are ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from alpaca_chat import __version__
from alpaca_chat.cli import run_reporting_errors
from alpaca_chat.errors import UsageError
from convert import commands, extras
from convert.commands import DEFAULT_COMMAND, PROG

OWN_COMMANDS = commands.COMMANDS


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and raise instead of exiting."""

    def error(self, message):
        raise UsageError(message)


# -- the parser ------------------------------------------------------------------


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show llama.cpp's and the converter's log")
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    parser = _ArgumentParser(
        prog=PROG,
        description="Convert a Hugging Face checkpoint to GGUF, quantize it with llama.cpp,\n"
        "and measure what quantization cost. Works offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.register(sub, common)
    if plugins:
        _add_plugins(sub)
    _mark_readiness(parser, sub)
    return parser


def _add_plugins(sub) -> None:
    """Subcommands owned elsewhere (fine-tuning) register themselves, if installed."""
    try:
        from convert import training_commands
    except ImportError:
        return
    register = getattr(training_commands, "register", None)
    if callable(register):
        register(sub)


def _mark_readiness(parser: argparse.ArgumentParser, sub) -> None:
    """Each command's line in --help says whether it runs with what is installed; the
    epilog gives the install command of each extra still missing."""
    for choice in sub._choices_actions:
        state = extras.status(choice.dest)
        choice.help = f"{choice.help} [{state}]"
        subparser = sub.choices[choice.dest]
        if state != "ready" and subparser.epilog is None:
            subparser.epilog = f"{choice.dest}: {state}: " + "; ".join(
                extras.install_command(extra) for extra in extras.missing_extras([choice.dest])
            )
    lines = [f"Without a subcommand, '{PROG} CHECKPOINT --quant TYPE...' runs '{DEFAULT_COMMAND}'."]
    missing = extras.missing_extras(sub.choices)
    if missing:
        lines.append("Commands not [ready] need an extra; install it with:")
        lines += [f"  {extra}: {extras.install_command(extra)}" for extra in missing]
    parser.epilog = "\n".join(lines)


# -- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _terminate_as_interrupt()

    def run() -> int:
        parser = build_parser(plugins=_needs_plugins(argv))
        full = _with_default_command(argv, parser)
        command = _command_named(full, parser)
        if command is not None and not any(arg in ("-h", "--help") for arg in full):
            extras.check(command)  # before the flags: a missing package first, whatever else is wrong
        args = parser.parse_args(full)
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return 2
        extras.check(args.command, args)  # what the flags bring (eval --ladder's plot...)
        _configure_logging(getattr(args, "verbose", False))
        return args.run(args)

    return run_reporting_errors(
        PROG, run, debug="--debug" in argv, interrupted="interrupted; no partial output was left behind"
    )


def _needs_plugins(argv: list[str]) -> bool:
    """Whether the command line may name a plugin's subcommand.

    Plugins (fine-tuning) may import torch and transformers when they build
    their parsers: seconds and hundreds of MB that export and quantize
    should not pay. They are loaded only for a command that is not ours and
    not a checkpoint path or hub id, or for the top-level help.
    """
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first is None:
        return not argv or any(arg in ("-h", "--help") for arg in argv)
    if first in OWN_COMMANDS:
        return False
    return not ("/" in first or os.sep in first or Path(first).exists())


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _with_default_command(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`alpaca-convert CHECKPOINT ...` means `alpaca-convert convert CHECKPOINT ...`."""
    names = _subcommands(parser)
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return argv
        if not arg.startswith("-"):
            return argv if arg in names else [DEFAULT_COMMAND, *argv]
    return argv


def _command_named(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in _subcommands(parser) else None


def _terminate_as_interrupt() -> None:
    """SIGTERM cleans up like Ctrl+C: temp files are removed on the way out."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a test runner's worker)
        pass


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    if verbose:
        from convert import llama_log

        llama_log.install(verbose=True)


if __name__ == "__main__":
    sys.exit(main())
