"""ChatSession on the real model: context budgeting, prefix reuse, saved rows."""

import threading

import pytest

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.errors import ContextOverflowError
from alpaca_chat.session import ChatSession
from alpaca_chat.store import Store
from alpaca_chat.templates import resolve_template


def make_session(engine, store=None, **kwargs):
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    kwargs.setdefault("sampling", SamplingParams(temperature=0, max_tokens=32))
    return ChatSession(engine, template, model_label="smollm2-135m", store=store, **kwargs)


@pytest.fixture(scope="module")
def small_engine(default_model_path):
    with Engine(default_model_path, n_ctx=256) as loaded:
        yield loaded


def test_overflow_drops_oldest_turns_keeps_system(small_engine):
    session = make_session(small_engine, system_prompt="You are a terse assistant.")
    dropped_any = []
    for i in range(8):
        reply = session.send(f"Tell me fact number {i} about the ocean, in detail please.")
        "".join(reply)
        dropped_any.append(len(reply.dropped))
        assert reply.stats.prompt_tokens + session.sampling.max_tokens <= small_engine.n_ctx
    assert sum(dropped_any) > 0, "with a 256-token context some turns must have been dropped"
    # Dropped turns are whole, oldest first, and the system prompt survives.
    assert session.memory_start > 0 and session.memory_start % 2 == 0
    in_memory = session._in_memory()
    assert in_memory[0].role == "system" and in_memory[1].content.startswith("Tell me fact number")
    assert in_memory[1].content != "Tell me fact number 0 about the ocean, in detail please."


def test_single_prompt_too_long_is_refused_and_user_message_kept(small_engine, tmp_path):
    with Store(tmp_path / "h.db") as store:
        session = make_session(small_engine, store=store)
        with pytest.raises(ContextOverflowError, match="does not fit"):
            session.send("word " * 400)
        [conversation] = store.list_conversations()
        assert [m.role for m in store.messages(conversation.id)] == ["user"]


def test_turns_reuse_the_cache_and_rows_are_saved(engine, tmp_path):
    engine.reset()
    with Store(tmp_path / "h.db") as store:
        session = make_session(engine, store=store, system_prompt="Be brief.")
        first = session.send("Name a planet.")
        "".join(first)
        second = session.send("Name another one.")
        "".join(second)
        assert second.stats.cached_tokens >= first.stats.prompt_tokens
        [conversation] = store.list_conversations()
        assert conversation.system_prompt == "Be brief."
        rows = store.messages(conversation.id)
        assert [(m.role, m.status) for m in rows] == [
            ("user", "complete"), ("assistant", "complete"), ("user", "complete"), ("assistant", "complete")]
        assert rows[1].content == first.text and rows[3].content == second.text
        assert rows[3].stats["cached_tokens"] == second.stats.cached_tokens
        assert rows[3].template == "gguf" and rows[3].model == "smollm2-135m"


def test_cancelled_reply_is_saved_as_stopped(engine, tmp_path):
    cancel = threading.Event()
    with Store(tmp_path / "h.db") as store:
        session = make_session(engine, store=store, sampling=SamplingParams(temperature=0, max_tokens=300))
        reply = session.send("Write a long poem about rain.", cancel=cancel)
        for i, _ in enumerate(reply):
            if i == 4:
                cancel.set()
        [conversation] = store.list_conversations()
        saved = store.messages(conversation.id)[1]
        assert saved.status == "stopped" and saved.content == reply.text and reply.text
        assert session.messages[-1].content == reply.text
