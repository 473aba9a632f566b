"""The request's tools, and the Hermes / Qwen2.5 prompt text for templates with no tool format. Pure.

A template that renders tools itself (Qwen, Hermes, Llama 3.x, Mistral) gets them as they are
(tool_formats). For any other, the tools are described in the system prompt the way Qwen2.5's
template does (a `<tools>` block, calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
and tool results go back as `<tool_response>` user turns.
"""

import json
import re
from dataclasses import dataclass

from alpaca_chat.server import tool_formats
from alpaca_chat.server.schemas import ApiError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

SYSTEM_TEXT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolSpec:
    tools: list[dict]  # OpenAI's {"type": "function", "function": {...}}, checked
    forced: list[str] | None  # names the reply must call one of (tool_choice required / named), or None

    def parameters(self, name: str) -> dict:
        return next(t["function"].get("parameters") or EMPTY_PARAMETERS for t in self.tools
                    if t["function"]["name"] == name)


def parse_tools(body: dict) -> ToolSpec | None:
    """The request's `tools` and `tool_choice`, checked; None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools is None:
        if choice not in ("auto", "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ApiError(400, "'tools' must be a non-empty array", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not NAME.match(function["name"]):
            raise ApiError(400, f"tools[{i}] must be a function with a name of letters, digits, _ or -",
                           param=f"tools[{i}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools[{i}].function.parameters")
    names = [t["function"]["name"] for t in tools]
    if choice == "none":
        return None
    if choice == "auto":
        return ToolSpec(tools, None)
    if choice == "required":
        return ToolSpec(tools, names)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if named not in names:
        raise ApiError(400, "'tool_choice' must be none, auto, required or one of the tools by name",
                       param="tool_choice")
    return ToolSpec(tools, [named])


def system_text(spec: ToolSpec) -> str:
    return SYSTEM_TEXT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in spec.tools))


def tool_result_text(content: str) -> str:
    """A `tool` message, as the user turn Hermes-style templates make of it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def checked_calls(calls) -> list[dict]:
    """An assistant message's `tool_calls`, checked: [{"id", "function": {"name", "arguments": a JSON value}}]."""
    checked = []
    for i, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"tool_calls[{i}] must have function.name", param="messages")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"tool_calls[{i}].function.arguments is not JSON", param="messages") from exc
        call_id = call.get("id")
        checked.append({"id": call_id if isinstance(call_id, str) else None,
                        "function": {"name": function["name"], "arguments": arguments}})
    return checked


def calls_text(calls: list[dict]) -> str:
    """Checked `tool_calls` (checked_calls), as a Hermes-style model writes them."""
    blocks = []
    for call in calls:
        value = {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        blocks.append("<tool_call>\n" + json.dumps(value, ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(blocks)


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside any `<tool_call>` block, or None; the calls in OpenAI's shape). A block that
    is not a call (not JSON, no name) is left in the text. Other formats: tool_formats."""
    return tool_formats.HERMES.parse(text, [])
