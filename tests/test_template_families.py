"""The chat template each family ships reaches the GGUF, and alpaca-chat renders it as transformers does.

For every case of tests/arch_cases whose tokenizer has a chat template: the GGUF's
`tokenizer.chat_template` is the checkpoint's, and the template alpaca-chat picks for
the GGUF (through its engine, as `alpaca-chat --model` does) renders a conversation
byte for byte as `tokenizer.apply_chat_template(..., tokenize=False)`.
"""

import json

import pytest

from convert_helpers import TINY_CASES, gguf_fields

transformers = pytest.importorskip("transformers", reason="needs the convert extra")

from alpaca_chat.conversation import Message  # noqa: E402
from alpaca_chat.engine import Engine  # noqa: E402
from alpaca_chat.loading import choose_template  # noqa: E402

# A bare SentencePiece case ("spm") has a tokenizer.model and no template, as Llama 2 base
# models; every other case writes its family's tokenizer files, template included.
TEMPLATE_CASES = [case.name for case in TINY_CASES if case.tokenizer != "spm"]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour.\nJust one."},
    {"role": "assistant", "content": "  Blue. "},
    {"role": "user", "content": "Another one, in 日本語?"},
]


def shipped_template(checkpoint) -> str | None:
    if (checkpoint / "chat_template.jinja").is_file():
        return (checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return config.get("chat_template")


@pytest.mark.parametrize("name", TEMPLATE_CASES)
def test_gguf_template_renders_like_transformers(name, tiny_builds):
    checkpoint, _, f16 = tiny_builds.get(name)
    shipped = shipped_template(checkpoint)
    assert shipped, f"{name}: its tokenizer ships no chat template"
    assert gguf_fields(f16)["tokenizer.chat_template"] == shipped

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    conversation = CONVERSATION
    try:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - e.g. Gemma 2 refuses a system turn: compare without it
        conversation = CONVERSATION[1:]
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    with Engine(f16, n_ctx=64) as engine:
        template = choose_template(engine, "auto", None)
    assert template.name == "gguf"
    got = template.render([Message(m["role"], m["content"]) for m in conversation], add_generation_prompt=True)
    assert got == expected
