"""OpenAI request bodies -> checked values, and the error shape. Pure: no I/O, no llama.cpp.

Every field a request may carry is checked here before anything reaches the engine: a bad
field is an `ApiError` (400 with `param` naming it), never an exception from deeper down.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine.logprobs import MAX_TOP_LOGPROBS
from alpaca_chat.errors import UsageError

# Sampling the API leaves unset: OpenAI's own defaults where it has them (no repeat penalty),
# the chat's otherwise.
API_SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
MAX_STOP_STRINGS = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """What /v1/chat/completions and /v1/completions ask for, checked."""

    model: str | None
    sampling: SamplingParams
    max_tokens: int | None  # None: as many as the server allows
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    messages: list[Message] = field(default_factory=list)  # chat
    prompt: str = ""  # completions
    # response_format: None, ("json_object", None) or ("json_schema", schema dict)
    response_format: tuple[str, dict | None] | None = None
    tools: Any = None  # tools.ToolSpec: the tools the reply may (or must) call
    sent: list[Message] = field(default_factory=list)  # the messages as sent (before tools are described)
    # the messages checked, as OpenAI dicts (role, content string, tool_calls, tool_call_id): what a
    # template with a tool format of its own renders (tool_formats.render)
    raw_messages: list[dict] = field(default_factory=list)
    logprobs: int | None = None  # None: none reported; else how many alternatives per token

    @property
    def has_tool_turns(self) -> bool:
        return any(m["role"] == "tool" or m.get("tool_calls") for m in self.raw_messages)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_chat(body: dict, max_tokens_limit: int) -> GenerationRequest:
    request = _common(body, max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    for i, raw in enumerate(messages):
        message, checked = _message(raw, i)
        request.messages.append(message)
        request.raw_messages.append(checked)
    request.response_format = _response_format(body.get("response_format"))
    request.logprobs = _chat_logprobs(body)
    from alpaca_chat.server.tools import parse_tools

    request.tools = parse_tools(body)
    if request.tools is not None and request.tools.forced and request.response_format is not None:
        raise ApiError(400, "use either response_format or a required tool call, not both", param="tool_choice")
    return request


def parse_completion(body: dict, max_tokens_limit: int) -> GenerationRequest:
    request = _common(body, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    request.prompt = prompt
    top = _typed(body, "logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, not {top}", param="logprobs")
    request.logprobs = top
    return request


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs` (bool) and `top_logprobs` (0..20, only with logprobs) -> alternatives or None."""
    wanted = _typed(body, "logprobs", bool, False)
    top = _typed(body, "top_logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, not {top}",
                       param="top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _common(body: dict, max_tokens_limit: int) -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None) or {}
    include_usage = bool(options.get("include_usage", False))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"'{param}' must be a positive integer, not {max_tokens!r}", param=param)
        if max_tokens > max_tokens_limit:
            raise ApiError(400, f"'{param}' is {max_tokens}; this server allows at most {max_tokens_limit}",
                           param=param)
    changes: dict[str, Any] = {}
    for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                       ("repeat_penalty", float), ("seed", int)):
        value = _typed(body, name, kind, None)
        if value is not None:
            changes[name] = value
    try:
        sampling = API_SAMPLING.with_changes(**changes)
    except UsageError as exc:
        raise ApiError(400, str(exc), param=next((k for k in changes if k in str(exc)), None)) from exc
    return GenerationRequest(model=model, sampling=sampling, max_tokens=max_tokens, stop=_stop(body.get("stop")),
                             stream=stream, include_usage=include_usage)


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name, default)
    if value is None or value is default:
        return value
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(400, f"'{name}' must be a {kind.__name__}, not {value!r}", param=name)
    return value


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return tuple(stop)


def _message(raw, index: int) -> tuple[Message, dict]:
    """The message for templates with no tool format (tool turns as Hermes text), and the checked dict."""
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"{param} must be an object", param=param)
    role = raw.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(ROLES)}, not {role!r}", param=f"{param}.role")
    content = raw.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{param}.content: only text parts are supported", param=f"{param}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string or an array of text parts", param=f"{param}.content")
    checked = {"role": "system" if role == "developer" else role, "content": content}
    text = content
    if role == "tool" or (role == "assistant" and raw.get("tool_calls")):
        from alpaca_chat.server import tools

        if role == "tool":
            call_id = raw.get("tool_call_id")
            checked["tool_call_id"] = call_id if isinstance(call_id, str) else None
            text = tools.tool_result_text(content)
        else:
            checked["tool_calls"] = tools.checked_calls(raw["tool_calls"])
            text = "\n".join(part for part in (content, tools.calls_text(checked["tool_calls"])) if part)
    return Message(ROLES[role], text), checked


def _response_format(raw) -> tuple[str, dict | None] | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be an object",
                           param="response_format.json_schema.schema")
        return ("json_schema", schema)
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")
