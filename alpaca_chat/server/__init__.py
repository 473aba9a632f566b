"""`alpaca-chat serve`: an OpenAI-compatible local server (needs the `serve` extra).

- `schemas`: request bodies -> checked values, and the OpenAI error shape (pure).
- `scheduler`: the thread that owns the engine and runs continuous batching.
- `app`: the Starlette routes (no llama.cpp).
- `prompt_cache`: idle sequences' KV states saved on disk, restored after a restart.
- `adapters`: `--lora NAME=FILE` as model names, each with its adapter set and prompt cache.
- `tools`, `tool_formats`: the request's tools and each template's tool-call format.
"""

import argparse
import ipaddress
import sys

from alpaca_chat.errors import UsageError

LOOPBACK_NAMES = {"localhost"}


def build_serve_parser(parser_class) -> argparse.ArgumentParser:
    p = parser_class(prog="alpaca-chat serve", description="Serve the OpenAI API for a local model.")
    p.add_argument("-m", "--model", help="a .gguf path, a registry name or a hub id (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", type=int, default=4, metavar="K", help="sequences decoded together (default 4)")
    p.add_argument("--ctx", type=int, dest="n_ctx", help="context size in tokens, shared by the sequences "
                                                         "(default min(4096, the model's))")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--template", default="auto", help="chat template: auto (default), alpaca, chatml, or PATH.jinja")
    p.add_argument("--lora", action="append", metavar="NAME=FILE[:SCALE]",
                   help="serve the model with this LoRA adapter as model BASE+NAME (repeatable; "
                        "requests pick one by their model name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait before 429 (default 64)")
    p.add_argument("--prompt-cache-mb", type=int, default=1024, metavar="MB",
                   help="disk budget of the prompt cache kept across restarts (default 1024; 0: none)")
    p.add_argument("--history", action="store_true",
                   help="save API conversations in the chat history (the app's sidebar; -c continues them)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> None:
    if not 1 <= args.parallel <= 64:
        raise UsageError("--parallel must be from 1 to 64")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be from 0 to 65535")
    if args.n_ctx is not None and args.n_ctx < 64:
        raise UsageError("--ctx must be at least 64")
    if args.prompt_cache_mb < 0:
        raise UsageError("--prompt-cache-mb must be 0 or more")
    if args.max_tokens_limit < 1 or args.max_queue < 1:
        raise UsageError("--max-tokens-limit and --max-queue must be positive")
    if not is_loopback(args.host) and not args.api_key and not args.no_auth:
        raise UsageError(f"binding {args.host} (not loopback) needs --api-key KEY, or --no-auth to serve anyone")


def serve(args) -> int:
    """Load the model and serve until interrupted."""
    check_args(args)
    try:
        import uvicorn

        from alpaca_chat.server.app import ServerConfig, create_app
    except ImportError as exc:
        raise UsageError(f"serve needs the serve extra: pip install 'alpaca-chat[serve]' ({exc})") from exc
    from alpaca_chat.loading import choose_template, load_engine, open_store
    from alpaca_chat.server.adapters import open_variants, parse_loras
    from alpaca_chat.server.history import ApiHistory

    named = parse_loras(args.lora)  # a malformed --lora stops us before the model loads

    if not is_loopback(args.host) and not args.api_key:
        print(f"alpaca-chat serve: warning: serving {args.host} with no API key (--no-auth): anyone who can "
              "reach it can use it", file=sys.stderr)
    store = open_store(args.history)
    engine, resolved = load_engine(args.model, n_ctx=args.n_ctx, threads=args.threads, verbose=args.verbose,
                                   n_seq_max=args.parallel)
    variants = None
    try:
        variants = open_variants(engine, resolved.name, named, args.prompt_cache_mb)
        template = choose_template(engine, args.template, resolved.template)
        # saved with a conversation: what --continue resolves again (a path for local files)
        label = str(resolved.path) if resolved.source == "local" else resolved.name
        config = ServerConfig(model_id=resolved.name, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                              default_max_tokens=min(512, args.max_tokens_limit), max_queue=args.max_queue,
                              history=ApiHistory(store, label, template.name) if store is not None else None)
        app = create_app(engine, template, config, variants=variants)
        variants = None  # the scheduler closes their prompt caches from now on
        adapters = f"; adapters as models {', '.join(list(app.state.scheduler.variants)[1:])}" if named else ""
        print(f"alpaca-chat serve: {resolved.name} on http://{args.host}:{args.port}/v1 "
              f"({args.parallel} parallel sequences, {engine.n_ctx}-token context{adapters})",
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info",
                    timeout_graceful_shutdown=5)
    finally:
        if variants is not None:  # never handed to a scheduler (startup failed)
            from alpaca_chat.server.adapters import close_variants

            close_variants(variants)
        engine.close()
        if store is not None:
            store.close()
    return 0
