"""The Textual app driven by Pilot over a scripted engine: no llama.cpp, no terminal."""

import threading
import time

import pytest

from alpaca_chat.config import Settings
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.errors import EngineError, ModelNotFoundError
from alpaca_chat.loading import saved_conversation
from alpaca_chat.tui.screens import ConfirmScreen, HelpScreen, TextPromptScreen
from alpaca_chat.tui.widgets import AssistantMessage, ConversationItem, MemoryDivider, UserMessage
from conftest import make_app, until
from fake_engine import FakeEngine, fake_loaded

SIZE = (100, 32)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine():
    return FakeEngine()


async def ready(pilot):
    await until(pilot, lambda: pilot.app.state == "ready", what="the model to load")


async def send(pilot, text):
    pilot.app.prompt.load_text(text)
    await pilot.press("enter")


async def exchange(pilot, text):
    """Send text and wait for the reply to finish."""
    app = pilot.app
    before = len(app.transcript.messages)
    await send(pilot, text)
    await until(pilot, lambda: len(app.transcript.messages) >= before + 2 and app.state == "ready",
                what="the reply")


def rows(store):
    [conversation] = store.list_conversations()
    return [(m.role, m.content, m.status) for m in store.messages(conversation.id)]


def shown(app):
    return [(type(w).__name__, w.text) for w in app.transcript.messages]


def notifications(app):
    return [n.message for n in app._notifications]


async def test_send_streams_in_batches_and_saves(engine, store):
    script = engine.enqueue(["Hello", " **world**", "\n\n```python\nprint(1)\n```"], gated=True)
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.status.model == "fake-model Q4_0" and app.status.ctx_total == 2048
        await send(pilot, "hi there")
        await until(pilot, lambda: app.state == "generating")
        assert app.prompt.text == ""
        script.gate.release(2)
        reply = app.transcript.last_reply()
        await until(pilot, lambda: reply.text == "Hello **world**", what="the first deltas on screen")
        assert app.state == "generating" and reply.status == "streaming"
        # The status bar counts the context as it fills: the prompt plus the tokens so far.
        prompt_tokens = len(engine.tokenize(engine.prompts[0]))
        await until(pilot, lambda: app.status.ctx_used == prompt_tokens + 2, what="the context count")
        script.gate.release(1)
        await until(pilot, lambda: app.state == "ready")
        assert shown(app) == [("UserMessage", "hi there"),
                              ("AssistantMessage", "Hello **world**\n\n```python\nprint(1)\n```")]
        assert reply.status == "complete" and "stopped" not in reply.border_title
        # Markdown rendered: the code block is a highlighted fence, not literal backticks.
        assert reply.query("MarkdownFence")
        assert rows(store) == [("user", "hi there", "complete"),
                               ("assistant", "Hello **world**\n\n```python\nprint(1)\n```", "complete")]
        assert app.status.tokens_per_s == 42.0 and app.status.ctx_used > 0
        assert "<|im_start|>user\nhi there" in engine.prompts[0]


async def test_escape_stops_and_keeps_the_partial_reply(engine, store):
    script = engine.enqueue(["one", " two", " three", " four"], gated=True)
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "count")
        script.gate.release(2)
        reply = app.transcript.last_reply()
        await until(pilot, lambda: reply.text == "one two")
        await pilot.press("escape")
        await until(pilot, lambda: app.state == "ready", what="the stop")
        assert reply.status == "stopped" and "stopped" in reply.border_title
        assert rows(store)[1] == ("assistant", "one two", "stopped")
        assert app.session.messages[-1].content == "one two"
        # Esc when nothing is generating does nothing harmful.
        await pilot.press("escape")
        assert app.state == "ready"


async def test_typing_while_a_reply_streams_neither_starves_the_stream_nor_loses_keys(engine, store):
    script = engine.enqueue(["one", " two", " three"], gated=True)
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "count")
        reply = app.transcript.last_reply()
        script.gate.release(1)
        await until(pilot, lambda: reply.text == "one")
        script.gate.release(1)
        # Keys faster than the typing pause: the due batch goes out right after one of them.
        typed = ""
        while reply.text != "one two":
            assert len(typed) < 40, "the stream stalled while the user typed"
            await pilot.press("x")
            typed += "x"
            await pilot.pause(0.05)
        assert app.state == "generating" and app.prompt.text == typed
        script.gate.release(1)
        await until(pilot, lambda: app.state == "ready")
        assert reply.text == "one two three" and app.prompt.text == typed


async def test_regenerate_replaces_the_last_reply(engine, store):
    engine.enqueue(["first answer"])
    engine.enqueue(["second answer"])
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "question")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.state == "ready" and shown(app)[-1][1] == "second answer")
        assert shown(app) == [("UserMessage", "question"), ("AssistantMessage", "second answer")]
        assert rows(store) == [("user", "question", "complete"), ("assistant", "second answer", "complete")]
        assert [m.content for m in app.session.messages] == ["question", "second answer"]


async def test_edit_last_message_and_resend(engine, store):
    engine.enqueue(["reply one"])
    engine.enqueue(["reply two"])
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "frist try")
        await pilot.press("ctrl+e")
        assert app.editing and app.prompt.text == "frist try"
        assert "editing" in app.prompt.border_title
        # Esc cancels an edit without losing anything.
        await pilot.press("escape")
        assert not app.editing and app.prompt.text == ""
        assert len(rows(store)) == 2
        await pilot.press("ctrl+e")
        app.prompt.load_text("first try")
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and shown(app)[-1][1] == "reply two")
        assert shown(app) == [("UserMessage", "first try"), ("AssistantMessage", "reply two")]
        assert rows(store) == [("user", "first try", "complete"), ("assistant", "reply two", "complete")]
        assert not app.editing


async def test_copy_reply(engine, store):
    engine.enqueue(["copy me"])
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "hi")
        await pilot.press("ctrl+o")
        assert app.clipboard == "copy me"
        assert any("Copied" in n for n in notifications(app))


async def test_input_keys_newline_recall_and_paste(engine, store):
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert app.prompt.text == "a\nb\nc" and app.state == "ready"
        app.prompt.clear()
        await exchange(pilot, "earlier one")
        await exchange(pilot, "earlier two")
        await pilot.press("up")
        assert app.prompt.text == "earlier two"
        await pilot.press("up")
        assert app.prompt.text == "earlier one"
        await pilot.press("down")
        assert app.prompt.text == "earlier two"
        await pilot.press("down")
        assert app.prompt.text == ""
        # Pasted text keeps its newlines and is not sent until Enter.
        from textual import events

        app.post_message(events.Paste("line 1\nline 2\n\nline 4"))
        await pilot.pause()
        assert app.prompt.text == "line 1\nline 2\n\nline 4" and app.state == "ready"
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and len(app.transcript.messages) == 6)
        assert app.session.messages[-2].content == "line 1\nline 2\n\nline 4"


async def test_slash_commands(engine, store, tmp_path):
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "/system Be brief.")
        await send(pilot, "/set temp 0.2")
        await send(pilot, "/set top_k 7")
        assert app.session.system_prompt == "Be brief."
        assert app.session.sampling.temperature == 0.2 and app.session.sampling.top_k == 7
        await exchange(pilot, "hello")
        [conversation] = store.list_conversations()
        assert conversation.system_prompt == "Be brief." and conversation.sampling["temperature"] == 0.2
        assert engine.prompts[-1].startswith("<|im_start|>system\nBe brief.")
        await send(pilot, "/set temp 0.3")
        assert store.get_conversation(conversation.id).sampling["temperature"] == 0.3

        await send(pilot, "/stats")
        assert any("reply: 1 tokens" in n for n in notifications(app))
        target = tmp_path / "out.md"
        await send(pilot, f"/export {target}")
        assert target.read_text().startswith("# hello") and "## Assistant" in target.read_text()
        await send(pilot, f"/export {tmp_path / 'out.json'}")
        assert '"role": "assistant"' in (tmp_path / "out.json").read_text()

        await send(pilot, "/set volume 11")
        await send(pilot, "/frobnicate")
        assert any("usage: /set" in n for n in notifications(app))
        assert any("unknown command /frobnicate" in n for n in notifications(app))

        await send(pilot, "/clear")
        assert shown(app) == [] and app.session.messages[-1].content == "ok"
        await send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

        await send(pilot, "/model other-model")
        await until(pilot, lambda: app.loads == [None, "other-model"] and app.state == "ready")
        assert store.get_conversation(conversation.id).model == "fake-model"

        await send(pilot, "/new")
        assert app.session.conversation_id is None and app.session.system_prompt == "Be brief."
        await send(pilot, "//not a command")
        await until(pilot, lambda: app.state == "ready" and len(shown(app)) == 2)
        assert shown(app)[0] == ("UserMessage", "/not a command")
        await send(pilot, "/exit")
        await pilot.pause()
    assert app.return_code == 0


async def test_command_palette_runs_the_same_actions(engine, store):
    engine.enqueue(["first"])
    engine.enqueue(["again"])
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "hi")
        await pilot.press("ctrl+p")
        await pilot.press(*"Regenerate")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and shown(app)[-1][1] == "again")
        await pilot.press("ctrl+p")
        await pilot.press(*"System prompt")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        await pilot.press(*"Speak French.", "enter")
        await until(pilot, lambda: app.session.system_prompt == "Speak French.")


def seed_conversations(store, titles):
    made = []
    for title in titles:
        conversation = store.create_conversation(model="fake-model", template="chatml", sampling={})
        store.add_message(conversation.id, "user", title)
        store.add_message(conversation.id, "assistant", f"answer to {title}")
        made.append(conversation)
    return made


def sidebar_titles(app):
    return [item.conversation.title for item in app.sidebar.query(ConversationItem)]


def highlighted_title(app):
    item = app.sidebar.query_one("#conversations").highlighted_child
    return item.conversation.title if isinstance(item, ConversationItem) else None


def highlight(app, title):
    listing = app.sidebar.query_one("#conversations")
    listing.focus()
    listing.index = sidebar_titles(app).index(title)


async def test_sidebar_open_new_rename_delete_filter(engine, store):
    seed_conversations(store, ["apples", "bananas", "cherries"])
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b")
        assert app.sidebar.display
        assert sidebar_titles(app) == ["cherries", "bananas", "apples"]  # newest first

        # Open the highlighted one.
        await pilot.press("down", "enter")
        await until(pilot, lambda: shown(app) == [("UserMessage", "bananas"),
                                                  ("AssistantMessage", "answer to bananas")])
        assert [m.content for m in app.session.messages] == ["bananas", "answer to bananas"]

        # Filter by text in titles and messages.
        await pilot.press("ctrl+f", *"cherr")
        await until(pilot, lambda: sidebar_titles(app) == ["cherries"])
        app.sidebar.query_one("#filter").value = ""
        # Settled: the whole list again, and show() has put the highlight back on the open one
        # (it does so after mounting the items: highlighting before that would be undone).
        await until(pilot, lambda: len(sidebar_titles(app)) == 3 and highlighted_title(app) == "bananas")
        await pilot.pause()

        # Rename the highlighted conversation with F2.
        highlight(app, "cherries")
        await until(pilot, lambda: highlighted_title(app) == "cherries")
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, TextPromptScreen))
        assert app.screen.query_one("Input").value == "cherries"
        app.screen.query_one("Input").value = "Cherry talk"
        await pilot.press("enter")
        await until(pilot, lambda: "Cherry talk" in sidebar_titles(app))
        assert "cherries" not in sidebar_titles(app)

        # Delete with confirmation: Esc keeps it, y deletes.
        highlight(app, "apples")
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("escape")
        assert len(store.list_conversations()) == 3
        await pilot.press("delete")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: len(sidebar_titles(app)) == 2)
        assert sorted(c.title for c in store.list_conversations()) == ["Cherry talk", "bananas"]

        # New conversation: the transcript empties; the next message makes a new row.
        await pilot.press("ctrl+n")
        assert shown(app) == [] and app.session.conversation_id is None
        await exchange(pilot, "dates")
        assert sidebar_titles(app)[0] == "dates"


async def test_deleting_the_open_conversation_starts_a_new_one(engine, store):
    [only] = seed_conversations(store, ["lonely"])
    app = make_app(engine, store, saved=only)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+b", "delete", "y")
        await until(pilot, lambda: store.list_conversations() == [])
        assert shown(app) == [] and app.session.conversation_id is None


async def test_resume_with_continue_restores_messages_and_settings(engine, store):
    conversation = store.create_conversation(
        model="fake-model", template="chatml", system_prompt="You are a pirate.",
        sampling=SamplingParams(temperature=0.1, seed=5).to_dict())
    store.add_message(conversation.id, "user", "ahoy")
    store.add_message(conversation.id, "assistant", "Arr, *matey*", status="stopped")
    saved = saved_conversation(store, continue_last=True, conversation_id=None)
    engine.enqueue(["Yo ho"])
    app = make_app(engine, store, saved=saved)
    async with app.run_test(size=SIZE) as pilot:
        # History is on screen before the model has loaded.
        assert shown(app) == [("UserMessage", "ahoy"), ("AssistantMessage", "Arr, *matey*")]
        assert app.transcript.last_reply().status == "stopped"
        await ready(pilot)
        assert app.loads == ["fake-model"]  # the conversation's model
        assert app.session.system_prompt == "You are a pirate."
        assert app.session.sampling.temperature == 0.1 and app.session.sampling.seed == 5
        await pilot.press("up")
        assert app.prompt.text == "ahoy"
        app.prompt.clear()
        await exchange(pilot, "where to?")
        assert "ahoy" in engine.prompts[-1] and "Arr, *matey*" in engine.prompts[-1]
        assert [r[0] for r in rows(store)] == ["user", "assistant", "user", "assistant"]


async def test_history_is_browsable_while_the_model_loads(engine, store):
    seed_conversations(store, ["old one"])
    release = threading.Event()
    started = []

    def slow_loader(spec):
        started.append(spec)
        deadline = time.monotonic() + 5
        while not release.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return fake_loaded(engine)

    app = make_app(engine, store, loader=slow_loader)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: started)
        assert app.state.startswith("loading")
        assert "loading" in str(app.status.render())
        await pilot.press("ctrl+b", "enter")
        await until(pilot, lambda: shown(app) == [("UserMessage", "old one"),
                                                  ("AssistantMessage", "answer to old one")])
        await send(pilot, "too early")
        assert any("still loading" in n for n in notifications(app))
        assert app.prompt.text == "too early"  # kept, to send once the model is ready
        release.set()
        await ready(pilot)
        assert [m.content for m in app.session.messages] == ["old one", "answer to old one"]


async def test_errors_are_notifications_not_crashes(engine, store):
    engine.enqueue(["partial"], error=EngineError("llama.cpp failed while generating"))
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "break")
        assert any("llama.cpp failed while generating" in n for n in notifications(app))
        assert app.transcript.last_reply().status == "error"
        assert rows(store)[1] == ("assistant", "partial", "error")
        # A bug-like exception is reported the same way, as one line.
        engine.enqueue(["x"], error=ValueError("bad\nsecond line"))
        await exchange(pilot, "again")
        assert any(n == "unexpected ValueError: bad" for n in notifications(app))
        assert app.is_running


async def test_prompt_too_long_for_the_context_is_a_notification(store):
    engine = FakeEngine(n_ctx=20)
    app = make_app(engine, store, settings=Settings(sampling=SamplingParams(max_tokens=4)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "word " * 40)
        await until(pilot, lambda: any("does not fit" in n for n in notifications(app)))
        await until(pilot, lambda: app.state == "ready")
        assert shown(app) == [("UserMessage", ("word " * 40).strip() + " ")]


async def test_model_that_fails_to_load_is_a_notification(store):
    def failing(spec):
        raise ModelNotFoundError(f"unknown model {spec!r}")

    app = make_app(FakeEngine(), store, settings=Settings(model="nope"), loader=failing)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state == "no model")
        assert any("unknown model 'nope'" in n for n in notifications(app))
        await send(pilot, "hello?")
        assert any("/model" in n for n in notifications(app))


async def test_divider_marks_where_the_models_memory_starts(store):
    engine = FakeEngine(n_ctx=60)
    for i in range(6):
        engine.enqueue([f"answer number {i} is here"])
    app = make_app(engine, store, settings=Settings(sampling=SamplingParams(max_tokens=8)))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for i in range(6):
            await exchange(pilot, f"question number {i} please")
        assert app.session.memory_start > 0
        [divider] = app.transcript.query(MemoryDivider)
        children = list(app.transcript.children)
        first_in_memory = children[children.index(divider) + 1]
        assert isinstance(first_in_memory, UserMessage)
        assert first_in_memory.text == app.session.messages[app.session.memory_start].content


async def test_transcript_follows_the_bottom_unless_scrolled_up(engine, store):
    long_reply = [f"line {i}\n\n" for i in range(80)]
    engine.enqueue(long_reply)
    script = engine.enqueue(long_reply, gated=True)
    app = make_app(engine, store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await exchange(pilot, "long")
        transcript = app.transcript
        await pilot.pause(0.1)
        assert transcript.max_scroll_y > 0 and transcript.scroll_y == transcript.max_scroll_y
        await send(pilot, "longer")
        script.gate.release(10)
        await pilot.pause(0.2)
        transcript.scroll_home(animate=False)  # the user scrolls up to read
        await pilot.pause(0.1)
        script.gate.release(70)
        await until(pilot, lambda: app.state == "ready")
        await pilot.pause(0.1)
        assert transcript.scroll_y == 0
        transcript.scroll_end(animate=False)
        await pilot.pause(0.1)
        assert isinstance(transcript.messages[-1], AssistantMessage)
