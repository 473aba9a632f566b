"""The HTTP side of `alpaca-chat serve`: Starlette routes in OpenAI's shapes. Knows no llama.cpp:
prompts are rendered and tokenized here, then generation is the scheduler's.

Every request is checked (body size, JSON, fields, model, prompt size) before it is queued;
every failure is one `{"error": {...}}` object with the right status.
"""

import asyncio
import contextlib
import hmac
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.errors import AlpacaChatError, UsageError
from alpaca_chat.server.scheduler import QueueFull, Scheduler, Stopping
from alpaca_chat.server import tool_formats, tools
from alpaca_chat.server.logprobs import chat_logprobs, completion_logprobs
from alpaca_chat.server.schemas import ApiError, GenerationRequest, parse_chat, parse_completion, parse_json

FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "cancelled": "stop", "length": "length",
                  "context_full": "length"}
DISCONNECT_POLL_S = 0.1
# A body over the limit is still read (and dropped) up to this many times the limit, so that a
# client that sends it whole before reading the answer gets its 413 rather than a reset.
DRAIN_FACTOR = 32


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    max_queue: int = 64
    history: Any = None  # history.ApiHistory with --history


def create_app(engine, template, config: ServerConfig, grammars=None, saved=None, variants=None) -> Starlette:
    """The ASGI app over a loaded engine and its chat template. `grammars` turns a response_format
    into a grammar (default: the engine's JSON-schema converter, imported when first needed); `saved`
    is the prompt cache on disk (prompt_cache.SavedPrefixes), None for none; `variants` (model id ->
    server.adapters.Variant, the base first) replaces it when adapters are served (--lora)."""
    from alpaca_chat.server.adapters import Variant

    variants = variants or {config.model_id: Variant(config.model_id, (), saved)}
    scheduler = Scheduler(engine, max_queue=config.max_queue, variants=variants)
    api = _Api(engine, template, config, scheduler, grammars)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.scheduler = scheduler
    return app


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


class _Api:
    def __init__(self, engine, template, config: ServerConfig, scheduler: Scheduler, grammars):
        self.engine = engine
        self.template = template
        self.config = config
        self.scheduler = scheduler
        self._grammars = grammars
        # the template's own tool-call format, and whether it renders tools itself
        self.tool_format, self.native_tools = tool_formats.detect(template.source)

    # -- routes ------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.model_id, **self.scheduler.status()})

    async def models(self, request: Request) -> Response:
        return await self._guarded(request, self._models)

    async def chat(self, request: Request) -> Response:
        return await self._guarded(request, self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, self._completions)

    async def _guarded(self, request: Request, handler) -> Response:
        try:
            self._authorize(request)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "alpaca-chat"}
            for model_id in self.scheduler.variants]})

    async def _chat(self, request: Request) -> Response:
        parsed = parse_chat(await self._body(request), self.config.max_tokens_limit)
        parsed.model = self._check_model(parsed)
        parsed.sent = list(parsed.messages)  # what the client sent, for --history
        if self.native_tools and (parsed.tools is not None or parsed.has_tool_turns):
            described = parsed.tools.tools if parsed.tools is not None else None
            prompt = tool_formats.render(self.template, tool_formats.template_messages(
                parsed.raw_messages, self.tool_format), described)
            return await self._generate(request, parsed, prompt, chat=True)
        if parsed.tools is not None:  # described in the system prompt, as Hermes-style templates do
            described = tools.system_text(parsed.tools)
            if parsed.messages[0].role == "system":
                described = f"{parsed.messages[0].content}\n\n{described}"
                parsed.messages = parsed.messages[1:]
            parsed.messages = [Message("system", described), *parsed.messages]
        try:
            prompt = self.template.render(parsed.messages)
        except AlpacaChatError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await self._generate(request, parsed, prompt, chat=True)

    async def _completions(self, request: Request) -> Response:
        parsed = parse_completion(await self._body(request), self.config.max_tokens_limit)
        parsed.model = self._check_model(parsed)
        return await self._generate(request, parsed, parsed.prompt, chat=False)

    # -- checks --------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit * DRAIN_FACTOR:
            raise too_large  # not even read: the client may see the connection close
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit * DRAIN_FACTOR:
                    raise too_large
                if size <= limit:
                    chunks.append(chunk)
        except ClientDisconnect as exc:
            raise ApiError(400, "the client went away while sending the body") from exc
        if size > limit:  # read to the end (and dropped), so that a client still sending gets the answer
            raise too_large
        return parse_json(b"".join(chunks))

    def _check_model(self, parsed: GenerationRequest) -> str:
        """The variant (model id) the request runs on: its `model`, or the base when it names none."""
        if parsed.model is None:
            return self.config.model_id
        if parsed.model not in self.scheduler.variants:
            known = ", ".join(f"'{m}'" for m in self.scheduler.variants)
            raise ApiError(404, f"the model '{parsed.model}' does not exist; this server has {known}",
                           param="model", code="model_not_found")
        return parsed.model

    def _sampling(self, parsed: GenerationRequest, n_prompt: int) -> SamplingParams:
        n_ctx = self.engine.n_ctx
        if n_prompt >= n_ctx:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; the context holds {n_ctx}",
                           param="messages" if parsed.messages else "prompt", code="context_length_exceeded")
        room = n_ctx - n_prompt
        if parsed.max_tokens is not None and parsed.max_tokens > room:
            raise ApiError(400, f"the prompt is {n_prompt} tokens and max_tokens {parsed.max_tokens}; "
                                f"the context holds {n_ctx}", param="max_tokens", code="context_length_exceeded")
        max_tokens = parsed.max_tokens or min(self.config.default_max_tokens, room)
        return SamplingParams(**{**parsed.sampling.to_dict(), "max_tokens": max_tokens,
                                 "grammar": self._grammar(parsed)})

    def _grammar(self, parsed: GenerationRequest) -> str | None:
        forced = parsed.tools is not None and parsed.tools.forced
        if parsed.response_format is None and not forced:
            return None
        if self._grammars is None:
            from alpaca_chat.engine import grammar

            self._grammars = grammar
        if forced:
            try:
                return self.tool_format.grammar(parsed.tools, self._grammars.json_schema_grammar)
            except UsageError as exc:
                raise ApiError(400, str(exc), param="tools") from exc
        kind, schema = parsed.response_format
        if kind == "json_object":
            return self._grammars.JSON_OBJECT_GRAMMAR
        try:
            return self._grammars.json_schema_grammar(schema)
        except UsageError as exc:
            raise ApiError(400, str(exc), param="response_format") from exc

    # -- generation ------------------------------------------------------------------

    async def _generate(self, request: Request, parsed: GenerationRequest, prompt: str, *, chat: bool) -> Response:
        tokens = self.engine.tokenize(prompt)
        sampling = self._sampling(parsed, len(tokens))
        stops = tuple(self.template.stop_strings) + parsed.stop if chat else parsed.stop
        try:
            stream = self.scheduler.submit(tokens, sampling, stops, variant=parsed.model, logprobs=parsed.logprobs)
        except Stopping as exc:
            raise ApiError(503, str(exc), type="server_error", code="shutting_down") from exc
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; try again later", type="rate_limit_error",
                           code="queue_full") from exc
        reply = _Reply(parsed.model, chat, parsed.tools, self.tool_format, logprobs=parsed.logprobs is not None)
        watcher = asyncio.create_task(_watch_disconnect(request, stream))
        if parsed.stream:
            return StreamingResponse(self._events(stream, reply, parsed, watcher, sampling),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text = "".join([delta async for delta in stream])
        except AlpacaChatError as exc:
            raise ApiError(500, str(exc), type="server_error") from exc
        finally:
            watcher.cancel()
        self._remember(parsed, text, sampling, stream.stats)
        return JSONResponse(reply.whole(text, stream.stats, stream.logprobs))

    def _remember(self, parsed: GenerationRequest, text: str, sampling: SamplingParams, stats) -> None:
        """With --history, save a chat and its reply (a failing store does not fail the reply)."""
        if self.config.history is None or not parsed.messages:
            return
        try:
            self.config.history.record(parsed.sent, text, sampling.to_dict(), stats,
                                       self.scheduler.variants[parsed.model].adapters)
        except AlpacaChatError as exc:
            print(f"alpaca-chat serve: warning: history not saved: {exc}", file=sys.stderr)

    async def _events(self, stream, reply: "_Reply", parsed: GenerationRequest, watcher, sampling):
        try:
            if reply.chat:
                yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            held = []  # with tools, the reply is parsed whole before it is sent
            async for delta in stream:
                held.append(delta)
                if not reply.tools:
                    yield _sse(reply.chunk({"content": delta} if reply.chat else delta, tokens=stream.logprobs))
            self._remember(parsed, "".join(held), sampling, stream.stats)
            finish = FINISH_REASONS[stream.stats.stop_reason]
            if reply.tools:
                content, calls = reply.parse("".join(held))
                if content:
                    yield _sse(reply.chunk({"content": content}, tokens=stream.logprobs))
                if calls:
                    finish = "tool_calls"
                    yield _sse(reply.chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]},
                                           tokens=stream.logprobs))
            yield _sse(reply.chunk({} if reply.chat else "", finish, tokens=stream.logprobs))
            if parsed.include_usage:
                yield _sse({**reply.head("chunk"), "choices": [], "usage": _usage(stream.stats)})
            yield b"data: [DONE]\n\n"
        except AlpacaChatError as exc:
            yield _sse(ApiError(500, str(exc), type="server_error").body())
        finally:
            stream.cancel()  # a no-op once it has ended; frees the sequence if the client went away
            watcher.cancel()


async def _watch_disconnect(request: Request, stream) -> None:
    """Cancel `stream` once the client has gone away (polled: the body has been read by now)."""
    while stream.stats is None:
        if await request.is_disconnected():
            stream.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


class _Reply:
    """The response objects of one request (chat.completion or text_completion)."""

    def __init__(self, model_id: str, chat: bool, spec=None, tool_format=tool_formats.HERMES, *,
                 logprobs: bool = False):
        self.chat = chat
        self.logprobs = logprobs
        self._sent_logprobs = 0  # how many tokens' logprobs the chunks so far carried
        self._sent_text = 0  # legacy completions: where the next chunk's tokens start in the text
        self.tools = spec is not None
        self.names = [t["function"]["name"] for t in spec.tools] if spec is not None else []
        self.tool_format = tool_format
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id

    def head(self, kind: str = "") -> dict:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if kind and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def chunk(self, delta, finish_reason: str | None = None, *, tokens=()) -> dict:
        """A chunk carrying `delta`; with logprobs, those of `tokens` (all generated so far) that no
        chunk has carried yet (a token's text may come in a later chunk than its logprob)."""
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        choice["logprobs"] = self._new_logprobs(tokens)
        choice["finish_reason"] = finish_reason
        return {**self.head("chunk"), "choices": [choice]}

    def _new_logprobs(self, tokens) -> dict | None:
        if not self.logprobs:
            return None
        new, self._sent_logprobs = tokens[self._sent_logprobs:], len(tokens)
        if self.chat:
            return chat_logprobs(new)
        shape = completion_logprobs(new, self._sent_text)
        self._sent_text += sum(map(len, shape["tokens"]))
        return shape

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        return self.tool_format.parse(text, self.names)

    def whole(self, text: str, stats, tokens=()) -> dict:
        finish = FINISH_REASONS[stats.stop_reason]
        if self.chat:
            message = {"role": "assistant", "content": text}
            if self.tools:
                message["content"], calls = self.parse(text)
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": self._new_logprobs(tokens), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._new_logprobs(tokens), "finish_reason": finish}
        return {**self.head(), "choices": [choice], "usage": _usage(stats)}
