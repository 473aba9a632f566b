"""The default model's prompt, rendered by us, equals transformers' apply_chat_template."""

import pytest

from alpaca_chat.conversation import Message
from alpaca_chat.templates import resolve_template

transformers = pytest.importorskip("transformers", reason="template parity needs the convert extra")

CONVERSATIONS = [
    [Message("user", "What is the capital of France?")],
    [Message("system", "You answer in French."), Message("user", "Hello!")],
    [
        Message("user", "Write a haiku about CPUs."),
        Message("assistant", "Silicon hums soft\nthreads braid in the L2 cache\nanswers bloom in time"),
        Message("user", "Now one about GPUs — with émojis 🚀 and  double  spaces."),
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_path):
    return transformers.AutoTokenizer.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name
    )


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "system", "multi-turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendered_prompt_equals_transformers(engine, hf_tokenizer, messages, add_generation_prompt):
    ours = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    assert ours.name == "gguf"
    theirs = hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == theirs


def test_prompt_token_ids_equal_transformers(engine, hf_tokenizer):
    ours = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    text = ours.render(CONVERSATIONS[2])
    assert engine.tokenize(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
