"""One command table, one dispatcher: every command in COMMANDS has a handler in both front ends,
and runs in both (line mode through LineChat, the app through Pilot over the scripted engine)."""

import io

import pytest

from alpaca_chat.commands import COMMANDS, CommandDispatcher, handles_commands, missing_handlers
from alpaca_chat.repl import LineChat
from alpaca_chat.session import ChatSession
from alpaca_chat.tui.commands import TuiCommands
from alpaca_chat.tui.screens import HelpScreen
from conftest import make_app, until
from fake_engine import FakeEngine, fake_loaded

NAMES = [c.name for c in COMMANDS]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("front_end", [LineChat, TuiCommands], ids=["line mode", "app"])
def test_every_command_has_a_handler(front_end):
    assert missing_handlers(front_end) == []


def handlers_without(name):
    return type("Partial", (), {n: (lambda self, args: None) for n in NAMES if n != name})


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_handler_fails_on_import_and_construction_not_when_run(name):
    with pytest.raises(TypeError, match=f"no handler for /{name}$"):
        handles_commands(handlers_without(name))  # as a decorator: when the module is imported
    with pytest.raises(TypeError, match=f"no handler for /{name}$"):
        CommandDispatcher(handlers_without(name)())
    CommandDispatcher(handles_commands(handlers_without(None))())  # a complete one is accepted


# Each command: the line that runs it, and what it must have done, in line mode and in the app.
# Both run after one exchange ("hello" -> "ok").
def line_mode_cases(tmp_path):
    said = lambda chat: chat.out.getvalue()  # noqa: E731
    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"any file: the scripted engine loads it")
    return {
        "lora": (f"/lora add {adapter}:0.5", lambda chat: [(s.name, s.scale) for s in chat.session.engine.adapters]
                 == [("style", 0.5)] and "(LoRA style×0.5 on)" in said(chat)
                 and chat.session.store.get_conversation(chat.session.conversation_id).adapters
                 == ({"path": str(adapter), "scale": 0.5},)),
        "help": ("/help", lambda chat: "/system TEXT" in said(chat)),
        "new": ("/new", lambda chat: chat.session.conversation_id is None and "(new conversation)" in said(chat)),
        "system": ("/system Be brief.", lambda chat: chat.session.system_prompt == "Be brief."),
        "set": ("/set temp 0.3", lambda chat: chat.session.sampling.temperature == 0.3),
        "model": ("/model other-model", lambda chat: chat.session.model_label == "other-model"
                  and "(now chatting with" in said(chat)),
        "stats": ("/stats", lambda chat: "reply: 1 tokens" in said(chat)),
        "clear": ("/clear", lambda chat: said(chat).endswith("\033[2J\033[H")),
        "export": (f"/export {tmp_path / 'out.md'}", lambda chat: (tmp_path / "out.md").read_text().startswith("# hello")),
        "exit": ("/exit", lambda chat: True),  # handle_command returns False: see below
    }


def app_cases(tmp_path):
    def notified(app, text):
        return any(text in n.message for n in app._notifications)

    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"any file: the scripted engine loads it")
    return {
        "lora": (f"/lora add {adapter}:0.5", lambda app: [(s.name, s.scale) for s in app.session.engine.adapters]
                 == [("style", 0.5)] and "LoRA style×0.5" in str(app.status.render())
                 and notified(app, "LoRA style×0.5 on")),
        "help": ("/help", lambda app: isinstance(app.screen, HelpScreen)),
        "new": ("/new", lambda app: app.session.conversation_id is None and app.transcript.messages == []),
        "system": ("/system Be brief.", lambda app: app.session.system_prompt == "Be brief."
                   and notified(app, "System prompt set.")),
        "set": ("/set temp 0.3", lambda app: app.session.sampling.temperature == 0.3),
        "model": ("/model other-model", lambda app: app.loads == [None, "other-model"] and app.state == "ready"),
        "stats": ("/stats", lambda app: notified(app, "reply: 1 tokens")),
        "clear": ("/clear", lambda app: app.transcript.messages == [] and len(app.session.messages) == 2),
        "export": (f"/export {tmp_path / 'out.md'}",
                   lambda app: (tmp_path / "out.md").exists() and notified(app, "Saved to")),
        "exit": ("/exit", lambda app: app.return_code == 0),
    }


@pytest.mark.parametrize("cases", [line_mode_cases, app_cases], ids=["line mode", "app"])
def test_every_command_has_a_case_here(cases, tmp_path):
    assert sorted(cases(tmp_path)) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_runs_in_line_mode(name, store, tmp_path):
    line, done = line_mode_cases(tmp_path)[name]
    loaded = fake_loaded()
    session = ChatSession(loaded.engine, loaded.template, model_label=loaded.label, store=store)
    chat = LineChat(session, output=io.StringIO(),
                    load_model=lambda spec: fake_loaded(FakeEngine(), name=spec))
    chat.reply_to("hello")
    assert chat.handle_command(line) is (name != "exit")
    assert done(chat), chat.out.getvalue()


@pytest.mark.anyio
@pytest.mark.parametrize("name", NAMES)
async def test_every_command_runs_in_the_app(name, store, tmp_path):
    line, done = app_cases(tmp_path)[name]
    app = make_app(FakeEngine(), store)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: app.state == "ready", what="the model")
        app.prompt.load_text("hello")
        await pilot.press("enter")
        await until(pilot, lambda: app.state == "ready" and len(app.transcript.messages) == 2, what="the reply")
        app.prompt.load_text(line)
        await pilot.press("enter")
        await until(pilot, lambda: done(app), what=f"{line} to take effect")
        assert not [n.message for n in app._notifications if n.severity == "error"]
