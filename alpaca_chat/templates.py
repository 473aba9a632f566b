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
from pathlib import Path

import jinja2
import jinja2.ext
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
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
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
        try:
            compiled = _sandbox().from_string(self.source)
            return compiled.render(
                messages=[self._as_dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"chat template '{self.name}' tried an unsafe operation: {exc}") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise TemplateError(f"chat template '{self.name}' failed to render: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise TemplateError(f"chat template '{self.name}' failed to render: {exc}") from exc

    def _as_dict(self, message: Message) -> dict:
        if self.supports_input:
            return {"role": message.role, "content": message.content, "input": message.input}
        return {"role": message.role, "content": message.flattened_content()}


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
