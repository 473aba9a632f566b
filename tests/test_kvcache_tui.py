"""Instant resume in the app (Pilot over a scripted engine): restore in a worker, the status bar, saving on switch."""

import pytest

from alpaca_chat import kvcache
from alpaca_chat.conversation import Message
from alpaca_chat.kvcache import KVCache
from alpaca_chat.loading import saved_conversation
from conftest import make_app, until
from fake_engine import FakeEngine, fake_loaded

pytestmark = pytest.mark.anyio
LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine(tmp_path):
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF fake model")
    return FakeEngine(model_path=model, stateful=True)


def seed(store, text):
    conversation = store.create_conversation(model="fake-model", template="chatml")
    store.add_message(conversation.id, "user", text)
    store.add_message(conversation.id, "assistant", "Noted.")
    return store.get_conversation(conversation.id)


def save_state_for(engine, conversation, store):
    template = fake_loaded(engine).template
    history = [Message(m.role, m.content) for m in store.messages(conversation.id)]
    tokens = engine.tokenize(template.render(history, add_generation_prompt=False))
    key = kvcache.state_key(engine.model_path, engine.n_ctx, "f16", f"{template.name}\n{template.source}")
    KVCache().save(conversation.id, key, tokens, b"fake state")
    return tokens


async def test_opening_a_conversation_restores_in_a_worker_while_typing_goes_on(engine, store):
    conversation = seed(store, LONG)
    tokens = save_state_for(engine, conversation, store)
    engine.restore_gate.clear()  # hold the restore
    app = make_app(engine, store, saved_conversation(store, True, None))
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, engine.restoring.is_set, "the restore to start")
        await pilot.press("h", "i")  # the UI thread is free while the worker restores
        await until(pilot, lambda: app.prompt.text == "hi", "the keys to be typed")
        assert engine.restores == []
        engine.restore_gate.set()
        await until(pilot, lambda: "restored" in str(app.status.render()), "the status bar")
        assert engine.restores == [tokens]
        assert f"restored {len(tokens) - 1:,} tokens" in str(app.status.render())
        engine.enqueue(["fine"])
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and len(app.transcript.messages) == 4, "the reply")
        assert "restored" not in str(app.status.render())  # a reply clears the note


async def test_switching_conversations_saves_the_one_left(engine, store, monkeypatch):
    first, second = seed(store, LONG), seed(store, "another " + LONG)
    app = make_app(engine, store, first)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: app.state == "ready", "the model")
        monkeypatch.setattr(app, "save_session_state", lambda: None)  # only the switch saves
        engine.enqueue(["ok"])
        app.prompt.load_text("a question")
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and len(app.transcript.messages) == 4, "the reply")
        assert not KVCache().path_for(first.id).exists()
        await app.open_conversation(second)
        await until(pilot, lambda: KVCache().path_for(first.id).exists(), "the state of the one left")
        assert not KVCache().path_for(second.id).exists()


async def test_a_reply_is_saved_after_it_is_shown(engine, store):
    conversation = seed(store, LONG)
    app = make_app(engine, store, conversation)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: app.state == "ready", "the model")
        engine.enqueue(["ok"])
        app.prompt.load_text("a question")
        await pilot.press("enter")
        await until(pilot, lambda: KVCache().path_for(conversation.id).exists(), "the save")
        assert app.transcript.messages[-1].text == "ok"
