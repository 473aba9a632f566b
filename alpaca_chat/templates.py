"""Chat templates: the GGUF's own Jinja (sandboxed), Stanford Alpaca, ChatML.

Pure: no I/O except reading a user-given `.jinja` file in `resolve_template`.
The Alpaca template here is the single definition shared with the converter:
`alpaca-convert` trains with `alpaca_prompt()` and writes `ALPACA_JINJA` into
the models it produces, so the chat renders exactly what the model was trained on.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alpaca_chat.conversation import Message
from alpaca_chat.errors import TemplateError

# Stanford Alpaca's two preambles (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)

# Multi-turn Alpaca: the preamble (or the system prompt) once, then for each turn
# "### Instruction:" [+ "### Input:"] + "### Response:" and the reply ended by EOS.
# With one user message this renders exactly Stanford's training prompt.
ALPACA_JINJA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if loop_messages and loop_messages[0].get('input') -%}"
    "{{- '" + ALPACA_PREAMBLE_WITH_INPUT + "' -}}"
    "{%- else -%}"
    "{{- '" + ALPACA_PREAMBLE + "' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '\\n\\n### Instruction:\\n' + message['content'] -}}"
    "{%- if message.get('input') -%}{{- '\\n\\n### Input:\\n' + message['input'] -}}{%- endif -%}"
    "{{- '\\n\\n### Response:' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATE_CHOICES = ("auto", "alpaca", "chatml")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML; chat templates expect plain JSON (as in transformers).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _sandbox() -> ImmutableSandboxedEnvironment:
    """The environment transformers' apply_chat_template uses, so renders match byte for byte.

    Templates come from downloaded files and are untrusted code: the immutable
    sandbox blocks attribute access to Python internals and mutation of inputs.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "gguf", "alpaca", "chatml" or a file path
    source: str  # the Jinja text
    bos_token: str = ""
    eos_token: str = ""
    # Text that ends a reply even if the model forgets to emit EOS.
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def supports_input(self) -> bool:
        """Whether the template has a slot for Message.input (only Alpaca does)."""
        return "'input'" in self.source and "### Input:" in self.source

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`, adapted first to what this template supports (see `Support`)."""
        support = _probe(self.source, self.bos_token, self.eos_token) if self._needs_probe else Support()
        dicts = support.adapt([self._as_dict(m) for m in messages])
        try:
            return _render(self.source, dicts, add_generation_prompt, self.bos_token, self.eos_token)
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"chat template '{self.name}' tried an unsafe operation: {_first_line(exc)}") from exc
        except _RENDER_ERRORS as exc:
            raise TemplateError(
                f"chat template '{self.name}' failed to render: {_first_line(exc)}; try --template chatml"
            ) from exc

    def render_with_tools(
        self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True
    ) -> str:
        """`messages` as the template's own dicts (tool calls and tool results included) and the
        `tools` described, through the template's Jinja as they are (no adaptation), in the same
        sandbox as `render`. Jinja's errors propagate: the caller (the server) answers them."""
        return _compiled(self.source).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    @property
    def _needs_probe(self) -> bool:
        return self.source not in (ALPACA_JINJA, CHATML_JINJA)

    def _as_dict(self, message: Message) -> dict:
        if self.supports_input:
            return {"role": message.role, "content": message.content, "input": message.input}
        return {"role": message.role, "content": message.flattened_content()}


# --- polyfills ------------------------------------------------------------------------------------
#
# Chat templates written for one model's conversations reject others: Gemma's and Mistral v0.1's
# raise on a system message, Llama 2's and Mistral's on two user messages in a row, some read
# `content` only as a list of typed parts. As llama.cpp's chat layer (minja) does, what a template
# supports is found by rendering probe conversations, and the messages are adapted before the
# real render: the system message folded into the first user message, consecutive messages of the
# same role merged, content given as typed parts.

_RENDER_ERRORS = (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)
_SYS, _U1, _U2 = "<<probe-system>>", "<<probe-user-1>>", "<<probe-user-2>>"


@dataclass(frozen=True)
class Support:
    """What a template can render as given; `adapt` makes a conversation fit the rest."""

    system_role: bool = True
    consecutive_roles: bool = True
    string_content: bool = True

    def adapt(self, messages: list[dict]) -> list[dict]:
        out = [dict(m) for m in messages]
        if not self.system_role and out and out[0]["role"] == "system":
            system = out.pop(0)["content"]
            if out and out[0]["role"] == "user":
                out[0]["content"] = f"{system}\n\n{out[0]['content']}" if system else out[0]["content"]
            elif system:
                out.insert(0, {"role": "user", "content": system})
        if not self.consecutive_roles:
            merged: list[dict] = []
            for m in out:
                if merged and merged[-1]["role"] == m["role"]:
                    merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']}\n\n{m['content']}"}
                else:
                    merged.append(m)
            out = merged
        if not self.string_content:
            out = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in out]
        return out


def _renders(source: str, messages: list[dict], bos: str, eos: str, *wanted: str) -> bool:
    try:
        text = _render(source, messages, True, bos, eos)
    except _RENDER_ERRORS:
        return False
    return all(w in text for w in wanted)


@lru_cache(maxsize=32)
def _probe(source: str, bos: str, eos: str) -> Support:
    """Render probe conversations to learn what `source` supports (cached per template)."""
    typed = lambda ms: [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in ms]  # noqa: E731
    user = [{"role": "user", "content": _U1}]
    string_content = _renders(source, user, bos, eos, _U1) or not _renders(source, typed(user), bos, eos, _U1)
    shape = (lambda ms: ms) if string_content else typed
    system = [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}]
    system_role = _renders(source, shape(system), bos, eos, _SYS, _U1)
    pair = [{"role": "user", "content": _U1}, {"role": "user", "content": _U2}]
    consecutive = _renders(source, shape(pair), bos, eos, _U1, _U2)
    return Support(system_role=system_role, consecutive_roles=consecutive, string_content=string_content)


@lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    return _sandbox().from_string(source)


def _render(source: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    template = _compiled(source)
    context = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
    try:  # tools=None, as transformers' apply_chat_template passes it: templates test `tools is not none`
        return template.render(**context, tools=None)
    except TypeError:  # a tool-use template iterates `tools` unguarded: a chat without tools
        return template.render(**context, tools=[])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant tokens): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def alpaca_template(eos_token: str) -> ChatTemplate:
    return ChatTemplate(
        name="alpaca",
        source=ALPACA_JINJA,
        eos_token=eos_token,
        stop_strings=("### Instruction:",),
    )


def chatml_template(bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    return ChatTemplate(
        name="chatml",
        source=CHATML_JINJA,
        bos_token=bos_token,
        eos_token=eos_token,
        stop_strings=("<|im_end|>",),
    )


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's training prompt for one example (what the converter trains on)."""
    return alpaca_template(eos_token="").render([Message("user", instruction, input=input)])


def resolve_template(
    choice: str,
    gguf_template: str | None,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate:
    """Pick the template for `--template auto|alpaca|chatml|PATH.jinja`.

    auto: the GGUF's own template (the one the model was trained with), else ChatML.
    """
    if choice == "alpaca" or (choice == "auto" and gguf_template == ALPACA_JINJA):
        return alpaca_template(eos_token)
    if choice == "chatml":
        return chatml_template(bos_token, eos_token)
    if choice == "auto":
        if gguf_template:
            return ChatTemplate("gguf", gguf_template, bos_token, eos_token)
        return chatml_template(bos_token, eos_token)
    return _template_from_file(Path(choice), bos_token, eos_token)


def _template_from_file(path: Path, bos_token: str, eos_token: str) -> ChatTemplate:
    if path.suffix not in (".jinja", ".j2"):
        raise TemplateError(
            f"unknown template '{path}': use auto, alpaca, chatml or a path to a .jinja file"
        )
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"template file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from exc
    try:
        _sandbox().parse(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"template file {path} has a syntax error on line {exc.lineno}: {exc.message}") from exc
    return ChatTemplate(str(path), source, bos_token, eos_token)
