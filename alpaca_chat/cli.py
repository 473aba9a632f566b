"""`alpaca-chat`: parse flags, call the library, print.

The only place that turns errors into exit codes: 0 success, 1 runtime error,
2 usage error, 130 interrupted. Heavy modules (llama_cpp, textual) are imported
only on the paths that need them, so `--prompt` starts fast.
"""

import argparse
import json
import os
import sys
import threading

from alpaca_chat import __version__
from alpaca_chat.errors import AlpacaChatError, UsageError

PROG = "alpaca-chat"
EXIT_INTERRUPTED = 130


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and raise instead of exiting."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog=PROG,
        description="Chat with a local GGUF model on the CPU, offline. "
        "Without --prompt, opens the full-screen chat "
        "(line mode with --plain, or when stdin or stdout is not a terminal).",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("-m", "--model", help="a .gguf path, a registry name (see --list-models) or a hub id owner/repo[:QUANT]")
    p.add_argument("-p", "--prompt", help="answer one prompt and exit; '-' reads the prompt from stdin")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("--template", help="chat template: auto (default), alpaca, chatml, or PATH.jinja")
    p.add_argument("--list-models", action="store_true", help="show the model registry and what is downloaded")
    p.add_argument("--plain", action="store_true", help="line-mode chat instead of the full-screen app")
    p.add_argument("-c", "--continue", dest="continue_last", action="store_true", help="continue the last conversation")
    p.add_argument("--conversation", type=int, metavar="ID", help="continue conversation ID")
    p.add_argument("--no-history", action="store_true", help="do not save this conversation")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and stats")
    p.add_argument("--stats", action="store_true", help="print timing stats to stderr")
    p.add_argument("--json-schema", metavar="FILE", help="with --prompt: the reply is JSON that FILE's schema accepts")
    p.add_argument("--grammar", metavar="FILE.gbnf", help="with --prompt: the reply follows this GBNF grammar")
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, dest="max_tokens", help="maximum tokens to generate (default 512)")
    g.add_argument("--temp", type=float, dest="temperature", help="temperature; 0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, dest="top_p", help="nucleus sampling (default 0.95)")
    g.add_argument("--top-k", type=int, dest="top_k", help="top-k sampling; 0 = off (default 40)")
    g.add_argument("--min-p", type=float, dest="min_p", help="min-p sampling (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, dest="repeat_penalty", help="repeat penalty (default 1.1)")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same output")
    r = p.add_argument_group("runtime")
    r.add_argument("--ctx", type=int, dest="n_ctx", help="context size in tokens (default min(4096, model's))")
    r.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    r.add_argument("--no-kv-cache", action="store_true", help="do not save or restore KV states (instant resume)")
    r.add_argument("--kv-type", metavar="f16|q8_0",
                   help="KV cache type: f16 (default), or q8_0 for half the memory and saved state size "
                        "(turns on flash attention)")
    r.add_argument("--kv-cache", nargs="?", const="list", choices=("list", "clear"), metavar="clear",
                   help="show the saved KV states per conversation; 'clear' deletes them all")
    r.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="apply a LoRA adapter GGUF on the model at run time, scaled by SCALE (default 1); "
                        "repeatable; /lora changes them in the chat")
    r.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    r.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=f"{PROG} export", description="Export a saved conversation.")
    p.add_argument("id", type=int, metavar="ID", help="conversation id (see the app's sidebar)")
    p.add_argument("--format", choices=("md", "json"), default=None, help="md (default) or json")
    p.add_argument("-o", "--output", metavar="PATH", help="write to PATH (atomically) instead of stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int:
        if argv[:1] == ["export"]:
            return _export(build_export_parser().parse_args(argv[1:]))
        if argv[:1] == ["serve"]:  # starlette/uvicorn are imported only here
            from alpaca_chat import server

            return server.serve(server.build_serve_parser(_ArgumentParser).parse_args(argv[1:]))
        return _run(build_parser().parse_args(argv))

    return run_reporting_errors(PROG, run, debug="--debug" in argv)


def run_reporting_errors(prog: str, run, *, debug: bool, interrupted: str = "") -> int:
    """Call run(); turn what it raises into one line on stderr and an exit code.

    The one boundary where errors become exit codes, shared by alpaca-convert.
    With --debug, errors propagate with their traceback.
    """
    try:
        return run()
    except KeyboardInterrupt:
        print(f"\n{prog}: {interrupted}" if interrupted else "", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AlpacaChatError as exc:
        if debug:
            raise
        _print_error(prog, str(exc))
        return exc.exit_code
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence for a one-line error
        if debug:
            raise
        _print_error(prog, f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)")
        return 1


def _print_error(prog: str, message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"{prog}: error: {first_line}", file=sys.stderr)


def _run(args) -> int:
    if args.list_models:
        from alpaca_chat import models

        print(models.format_model_table(models.list_models()))
        return 0
    if args.kv_cache is not None:
        return _kv_cache_command(args.kv_cache)
    if args.continue_last and args.conversation is not None:
        raise UsageError("use either --continue or --conversation, not both")
    if (args.json_schema or args.grammar) and args.prompt is None:
        raise UsageError("--json-schema and --grammar need --prompt")
    settings = _settings(args)
    if args.prompt is None:
        terminal = sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
        if args.plain or not terminal:
            return _line_mode(args, settings)  # also reads a pipe, a line per message or command
        return _full_screen(args, settings)
    prompt, context = _read_prompt(args.prompt)
    return _one_shot(args, settings, prompt, context)


def _export(args) -> int:
    from alpaca_chat import export
    from alpaca_chat.store import Store

    with Store() as store:
        if args.output:
            fmt = args.format or export.format_for_path(args.output)
            conversation = store.get_conversation(args.id)
            export.write_atomic(args.output, export.render(conversation, store.messages(args.id), fmt))
        else:
            conversation = store.get_conversation(args.id)
            sys.stdout.write(export.render(conversation, store.messages(args.id), args.format or "md"))
    return 0


def _open_session(args, settings):
    from alpaca_chat.loading import open_session

    return open_session(
        settings,
        continue_last=args.continue_last,
        conversation_id=args.conversation,
        save_history=not args.no_history,
        verbose=args.verbose,
    )


def _line_mode(args, settings) -> int:
    from alpaca_chat import repl
    from alpaca_chat.loading import load_model

    return repl.run(
        _open_session(args, settings),
        load_model=lambda spec: load_model(spec, settings, verbose=args.verbose),
    )


def _full_screen(args, settings) -> int:
    """The Textual app: the model loads inside it, so only the history is opened here."""
    from alpaca_chat.loading import check_adapters, open_store, saved_conversation
    from alpaca_chat.tui import run_app

    store = open_store(not args.no_history, warn=False)
    saved = saved_conversation(store, args.continue_last, args.conversation)
    check_adapters(settings.model or (saved.model if saved else None), settings.lora)
    return run_app(settings, store, saved, verbose=args.verbose)


def _settings(args):
    from alpaca_chat import config, paths

    file_layer = {}
    path = paths.config_file_path()
    if path.is_file():
        file_layer = config.parse_config(path.read_text(encoding="utf-8"), str(path))
    flags = {
        "model": args.model,
        "template": args.template,
        "system": args.system,
        "n_ctx": args.n_ctx,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": args.seed,
        "kv_cache": False if args.no_kv_cache else None,
        "kv_type": args.kv_type,
        "lora": args.lora,
    }
    config.check_flags(flags)
    if args.lora:
        flags["lora"] = config.lora_specs(args.lora, None)
    return config.build_settings(file_layer, config.env_overrides(os.environ), flags)


def _read_prompt(prompt: str) -> tuple[str, str]:
    """Return (prompt, context): with --prompt -, piped stdin is the prompt; else it is context."""
    piped = "" if sys.stdin.isatty() else sys.stdin.read()
    if prompt == "-":
        prompt, piped = piped, ""
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt, piped.strip()


def _one_shot(args, settings, prompt: str, context: str) -> int:
    grammar = _read_grammar(args)
    session = _open_session(args, settings)
    if grammar is not None:
        from dataclasses import replace

        session.sampling = replace(session.sampling, grammar=grammar)
    cancel = threading.Event()
    reply = session.send(prompt, input=context, cancel=cancel)
    try:
        for delta in reply:
            if not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
    except KeyboardInterrupt:
        reply.deltas.close()  # saves the partial reply as 'stopped'
        if not args.json:
            sys.stdout.write("\n")
        _print_error_stats(args, reply)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(_json_result(session, reply), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    _print_error_stats(args, reply)
    session.save_state()  # after the reply is shown: the next -c resumes from it
    return 0


def _read_grammar(args) -> str | None:
    """The grammar of --grammar FILE.gbnf, or of --json-schema FILE's schema (None without either)."""
    if args.json_schema and args.grammar:
        raise UsageError("use either --json-schema or --grammar, not both")
    path = args.json_schema or args.grammar
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    if args.grammar:
        return text
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise UsageError(f"{path} must hold a JSON schema object")
    from alpaca_chat.engine.grammar import json_schema_grammar

    return json_schema_grammar(schema)


def _kv_cache_command(action: str) -> int:
    from alpaca_chat import kvcache

    cache = kvcache.KVCache()
    if action == "clear":
        print(f"Deleted {cache.clear()} saved KV state(s) from {cache.directory}.")
        return 0
    entries = cache.entries()
    titles = {}
    if entries:
        from alpaca_chat.loading import open_store

        store = open_store(True, warn=False)
        for entry in entries:
            try:
                titles[entry.conversation_id] = store.get_conversation(entry.conversation_id).title or "(untitled)"
            except AlpacaChatError:
                pass
        store.close()
    print(kvcache.format_usage(entries, titles))
    return 0


def _json_result(session, reply) -> dict:
    return {
        "text": reply.text,
        "model": session.model_label,
        "template": session.template.name,
        "lora": [str(spec) for spec in getattr(session.engine, "adapters", ())],  # FILE:SCALE each
        "conversation_id": session.conversation_id,
        "dropped_messages": len(reply.dropped),
        "stats": reply.stats.to_dict(),
        # Instant resume: prompt tokens restored from the saved KV state, and what that took.
        "kv_restored_tokens": getattr(session, "restored_tokens", 0),
        "kv_restore_s": getattr(session, "last_restore_s", 0.0),
    }


def _print_error_stats(args, reply) -> None:
    if reply.dropped:
        print(f"{PROG}: note: {len(reply.dropped)} old message(s) no longer fit the context and were left out",
              file=sys.stderr)
    if args.stats and reply.stats:
        print(format_stats(reply.stats), file=sys.stderr)


def format_stats(stats) -> str:
    from alpaca_chat.commands import format_stats as describe

    return describe(stats)
