"""Tool-call formats of chat templates (Hermes/Qwen `<tool_call>`, Llama 3.x JSON, Mistral `[TOOL_CALLS]`).

Pure: no I/O, no llama.cpp. `detect` reads the format from the model's chat template; each format
parses a reply into OpenAI `tool_calls`, makes the grammar of a forced call, and says how call ids
look (Mistral's templates demand 9 letters or digits). `render` passes `tools`, `tool_calls` and
`tool` messages to a template that takes them, as transformers' apply_chat_template does.

The engine detokenizes without control tokens, so a marker that is a control token in the model's
vocabulary (`[TOOL_CALLS]`, `[ARGS]`, `<|python_tag|>`) may be missing from the text: the parsers
accept a reply with or without it.
"""

import hashlib
import json
import re
import uuid

import jinja2

from alpaca_chat.server.schemas import ApiError

# GBNF tokens: string literals, character classes, rule names (anything else is punctuation).
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z][A-Za-z0-9-]*')
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _prefixed(gbnf: str, prefix: str) -> str:
    """`gbnf` with every rule name prefixed (so that several converted schemas fit one grammar)."""
    return _GBNF_TOKEN.sub(lambda m: m.group(0) if m.group(0)[0] in '"[' else prefix + m.group(0), gbnf)


def _schema_rule(json_schema_grammar, schema: dict, prefix: str) -> tuple[str, str]:
    """(the name of the rule matching `schema`'s JSON texts, the rules)."""
    return prefix + "root", _prefixed(json_schema_grammar(schema), prefix)


def _call_object(name: str, key: str, parameters: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, key: parameters}, "required": ["name", key]}


def _lit(text: str) -> str:
    return json.dumps(text)


class ToolFormat:
    """One way of writing calls. Subclasses set `name`, `key` (the arguments' key) and the text around."""

    name = "hermes"
    key = "arguments"

    def call_id(self, original: str | None = None) -> str:
        """An id for a new call (`original` None), or the id a template accepts for a client's."""
        return original if original is not None else f"call_{uuid.uuid4().hex[:24]}"

    def result_content(self, content: str):
        """A tool message's content as the template should get it."""
        return content

    def parse(self, text: str, names: list[str]) -> tuple[str | None, list[dict]]:
        """(the text outside any call, or None when there is none; the calls in OpenAI's shape).
        A reply with no call is returned as it is."""
        raise NotImplementedError

    def grammar(self, spec, json_schema_grammar) -> str:
        """A reply that is one call of a forced tool (`spec.forced`), its arguments per the tool's schema."""
        raise NotImplementedError

    def openai_call(self, name: str, arguments) -> dict:
        return {"id": self.call_id(), "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class Hermes(ToolFormat):
    """Qwen2.5/3, Hermes 2/3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block a call."""

    CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>")  # Qwen3's, before a call with thinking off

    def parse(self, text, names):
        calls, kept, last = [], [], 0
        for match in self.CALL.finditer(text):
            value = _json(match.group(1))
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                continue  # not a call: left in the text
            calls.append(self.openai_call(value["name"], value.get("arguments", {})))
            kept.append(text[last:match.start()])
            last = match.end()
        if not calls:
            return text, []
        kept.append(text[last:])
        return (self.EMPTY_THINK.sub("", "".join(kept)).strip() or None), calls

    def grammar(self, spec, json_schema_grammar):
        schema = {"anyOf": [_call_object(n, self.key, spec.parameters(n)) for n in spec.forced]}
        rule, rules = _schema_rule(json_schema_grammar, schema, "call-")
        return f'root ::= "<tool_call>\\n" {rule} "\\n</tool_call>"\n{rules}'


class Llama3(ToolFormat):
    """Llama 3.1/3.2/3.3: the reply is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` in
    some versions), several separated by `;`. A bare JSON reply counts as a call only when it names a
    tool of the request (a user may ask for JSON)."""

    name = "llama3"
    key = "parameters"
    TAG = "<|python_tag|>"

    def result_content(self, content):
        # The template writes any iterable (a string too) with tojson: a JSON result goes as the
        # object, so the model reads {"a": 1} rather than "{\"a\": 1}".
        value = _json(content)
        return value if isinstance(value, (dict, list)) else content

    def parse(self, text, names):
        body = text.strip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        calls, decoder, at = [], json.JSONDecoder(), 0
        while at < len(body):
            try:
                value, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                break
            if not (isinstance(value, dict) and value.get("name") in names
                    and isinstance(value.get("parameters", value.get("arguments", {})), dict)):
                break
            calls.append(self.openai_call(value["name"], value.get("parameters", value.get("arguments", {}))))
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        if not calls:
            return text, []
        return (body[at:].strip() or None), calls

    def grammar(self, spec, json_schema_grammar):
        schema = {"anyOf": [_call_object(n, self.key, spec.parameters(n)) for n in spec.forced]}
        rule, rules = _schema_rule(json_schema_grammar, schema, "call-")
        return f"root ::= {rule}\n{rules}"


class Mistral(ToolFormat):
    """Mistral v3 (Nemo, 7B v0.3): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; call ids
    are 9 letters or digits. Also parses the newer `[TOOL_CALLS]name[ARGS]{...}` form (see MistralArgs)."""

    name = "mistral"
    MARK = "[TOOL_CALLS]"
    # the newer form: name, an optional [CALL_ID]id, then [ARGS] (markers possibly not in the text)
    NAMED = re.compile(r"\s*(?:\[TOOL_CALLS\])?\s*([A-Za-z0-9_-]{1,64})(?:\[CALL_ID\][A-Za-z0-9]*)?\s*(?:\[ARGS\])?\s*")

    def call_id(self, original=None):
        if original is None:
            return "".join(_ALNUM[b % 62] for b in uuid.uuid4().bytes[:9])
        if len(original) == 9 and original.isalnum() and original.isascii():
            return original
        # a client's id from another server: the same 9 characters for its call and its result
        return "".join(_ALNUM[b % 62] for b in hashlib.sha256(original.encode()).digest()[:9])

    def parse(self, text, names):
        body = text.strip()
        start = body.find(self.MARK)
        head, rest = (body[:start], body[start + len(self.MARK):]) if start >= 0 else ("", body)
        calls, at = self._parse_array(rest)
        if not calls:
            calls, at = self._parse_named(rest, names, start >= 0)
        if not calls:
            return text, []
        return ((head + rest[at:]).strip() or None), calls

    def _parse_array(self, rest: str) -> tuple[list[dict], int]:
        try:
            value, end = json.JSONDecoder().raw_decode(rest.lstrip())
        except json.JSONDecodeError:
            return [], 0
        value = [value] if isinstance(value, dict) else value
        if not isinstance(value, list) or not value or not all(
                isinstance(v, dict) and isinstance(v.get("name"), str) for v in value):
            return [], 0
        skipped = len(rest) - len(rest.lstrip())
        return [self.openai_call(v["name"], v.get("arguments", {})) for v in value], end + skipped

    def _parse_named(self, rest: str, names: list[str], marked: bool) -> tuple[list[dict], int]:
        calls, at, decoder = [], 0, json.JSONDecoder()
        while (match := self.NAMED.match(rest, at)) is not None:
            name = match.group(1)
            if not (marked or calls or name in names):
                break  # without the marker, only a tool of the request counts as a call
            try:
                arguments, end = decoder.raw_decode(rest, match.end())
            except json.JSONDecodeError:
                break
            if not isinstance(arguments, dict):
                break
            calls.append(self.openai_call(name, arguments))
            at = end
        return calls, at

    def grammar(self, spec, json_schema_grammar):
        schema = {"anyOf": [_call_object(n, "arguments", spec.parameters(n)) for n in spec.forced]}
        rule, rules = _schema_rule(json_schema_grammar, schema, "call-")
        return f'root ::= "[TOOL_CALLS][" {rule} "]"\n{rules}'


class MistralArgs(Mistral):
    """Mistral Small 3.1/3.2, Devstral, Magistral: `[TOOL_CALLS]name[ARGS]{...}`, a call after another."""

    name = "mistral-args"

    def grammar(self, spec, json_schema_grammar):
        alternatives, rules = [], []
        for i, name in enumerate(spec.forced):
            rule, converted = _schema_rule(json_schema_grammar, spec.parameters(name), f"args{i}-")
            alternatives.append(f'{_lit(name)} "[ARGS]" {rule}')
            rules.append(converted)
        return 'root ::= "[TOOL_CALLS]" (' + " | ".join(alternatives) + ")\n" + "\n".join(rules)


HERMES, LLAMA3, MISTRAL, MISTRAL_ARGS = Hermes(), Llama3(), Mistral(), MistralArgs()


def detect(source: str) -> tuple[ToolFormat, bool]:
    """(the template's call format, whether the template itself renders `tools` and tool messages).
    A template with no format of its own gets Hermes', described by the server (tools.system_text)."""
    takes_tools = re.search(r"\btools\b", source) is not None
    if "[TOOL_CALLS]" in source:
        return (MISTRAL_ARGS if "[ARGS]" in source else MISTRAL), takes_tools
    if "<tool_call>" in source:
        return HERMES, takes_tools
    if "<|start_header_id|>" in source and '"parameters"' in source:
        return LLAMA3, takes_tools
    return HERMES, False


def template_messages(raw: list[dict], fmt: ToolFormat) -> list[dict]:
    """Checked OpenAI messages as chat templates read them: tool calls' arguments as objects, ids
    the format accepts, `tool_calls` only on the messages that have some."""
    out = []
    for message in raw:
        item = {"role": message["role"], "content": message["content"]}
        if message.get("tool_calls"):
            item["tool_calls"] = [{"id": fmt.call_id(str(call.get("id") or f"call{i}")), "type": "function",
                                   "function": {"name": call["function"]["name"],
                                                "arguments": call["function"]["arguments"]}}
                                  for i, call in enumerate(message["tool_calls"])]
        if message["role"] == "tool":
            item["content"] = fmt.result_content(message["content"])
            item["tool_call_id"] = fmt.call_id(str(message.get("tool_call_id") or "call0"))
        out.append(item)
    return out


def render(template, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt of `messages` (template_messages) and `tools` through the template's own Jinja
    (`ChatTemplate.render_with_tools`), its errors as 400s."""
    try:
        return template.render_with_tools(messages, tools)
    except jinja2.exceptions.SecurityError as exc:
        raise ApiError(400, f"the chat template tried an unsafe operation: {_first_line(exc)}",
                       param="messages") from exc
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ApiError(400, f"the model's chat template refused these messages: {_first_line(exc)}",
                       param="messages") from exc


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
