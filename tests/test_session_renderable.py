"""A conversation stays renderable on templates that demand alternating roles and no system role
(Mistral v0.1, Llama 2, Gemma): after an overflowed message, after an empty stopped reply, and
after the conversation is reopened from the store."""

import pytest

from alpaca_chat.conversation import Message
from alpaca_chat.errors import ContextOverflowError
from alpaca_chat.session import ChatSession
from alpaca_chat.templates import ChatTemplate
from fake_engine import FakeEngine

# Mistral-7B-Instruct-v0.1's template (system role and non-alternating roles raise).
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def strict_session(store, engine, **kwargs):
    template = ChatTemplate("mistral-v0.1", MISTRAL_V01, "<s>", "</s>")
    return ChatSession(engine, template, model_label="fake", store=store, system_prompt="Be brief.", **kwargs)


def say(session, text):
    return "".join(session.send(text))


def test_after_an_overflowed_message(store):
    engine = FakeEngine(n_ctx=80)
    session = strict_session(store, engine)
    with pytest.raises(ContextOverflowError):
        say(session, "word " * 200)
    engine.enqueue(["fine"])
    assert say(session, "hi") == "fine"
    assert engine.prompts[-1] == "<s>[INST] Be brief.\n\nhi [/INST]"  # the overflowed message was dropped


def test_after_an_empty_stopped_reply_and_when_reopened(store):
    engine = FakeEngine()
    session = strict_session(store, engine)
    engine.enqueue([])  # stopped before its first token
    assert say(session, "one") == ""
    engine.enqueue(["two!"])
    assert say(session, "two") == "two!"
    history = [Message(m.role, m.content) for m in store.messages(session.conversation_id)]
    reopened = strict_session(store, engine, conversation_id=session.conversation_id, history=history)
    engine.enqueue(["three!"])
    assert say(reopened, "three") == "three!"


def test_two_user_messages_in_a_row_render_merged():
    template = ChatTemplate("mistral-v0.1", MISTRAL_V01, "<s>", "</s>")
    text = template.render([Message("system", "S"), Message("user", "a"), Message("user", "b")])
    assert text == "<s>[INST] S\n\na\n\nb [/INST]"
