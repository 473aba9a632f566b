"""Taking back the last exchange, saving settings, export and the commands table: no model needed."""

import json

import pytest

from alpaca_chat import cli, export
from alpaca_chat.commands import is_command, parse_command, parse_set
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.errors import AlpacaChatError, StoreError, UsageError
from alpaca_chat.session import ChatSession
from fake_engine import fake_loaded


def chat(store, **kwargs):
    loaded = fake_loaded()
    session = ChatSession(loaded.engine, loaded.template, model_label=loaded.label, store=store, **kwargs)
    return session, loaded.engine


def say(session, text):
    reply = session.send(text)
    "".join(reply)
    return reply


def saved(store, session):
    return [(m.role, m.content) for m in store.messages(session.conversation_id)]


def test_delete_last_turn_removes_the_last_user_message_and_after(store):
    conversation = store.create_conversation("m", "chatml")
    for role, text in [("user", "a"), ("assistant", "A"), ("user", "b"), ("assistant", "B")]:
        store.add_message(conversation.id, role, text)
    assert store.delete_last_turn(conversation.id) == 2
    assert [m.content for m in store.messages(conversation.id)] == ["a", "A"]
    store.add_message(conversation.id, "user", "c")
    assert [m.seq for m in store.messages(conversation.id)] == [1, 2, 3]
    assert store.delete_last_turn(conversation.id) == 1
    store.delete_last_turn(conversation.id)
    assert store.delete_last_turn(conversation.id) == 0
    with pytest.raises(StoreError):
        store.delete_last_turn(999)


def test_rewind_takes_back_the_last_exchange_everywhere(store):
    session, engine = chat(store)
    engine.enqueue(["one"])
    engine.enqueue(["two"])
    say(session, "first")
    say(session, "second")
    user = session.rewind()
    assert user.content == "second"
    assert [m.content for m in session.messages] == ["first", "one"]
    assert saved(store, session) == [("user", "first"), ("assistant", "one")]
    engine.enqueue(["two again"])
    say(session, user.content)
    assert saved(store, session)[-2:] == [("user", "second"), ("assistant", "two again")]


def test_rewind_with_nothing_to_take_back():
    session, _ = chat(None, system_prompt="sys")
    assert session.rewind() is None
    assert session.messages[0].role == "system"


def test_rewind_keeps_memory_start_in_range(store):
    session, _ = chat(store)
    say(session, "a")
    session.memory_start = 2  # as if the first exchange had fallen out of the context
    session.rewind()
    assert session.memory_start == 0


def test_settings_are_saved_with_the_conversation(store):
    session, _ = chat(store, system_prompt="Be kind.")
    session.save_settings()  # nothing saved yet: no conversation, no error
    say(session, "hi")
    session.set_system_prompt("Be brief.")
    session.sampling = session.sampling.with_changes(temperature=0.3)
    session.save_settings()
    other = fake_loaded(name="other-model")
    session.switch_model(other.engine, other.template, other.label)
    conversation = store.get_conversation(session.conversation_id)
    assert conversation.system_prompt == "Be brief."
    assert conversation.sampling["temperature"] == 0.3
    assert conversation.model == "other-model"


def test_context_tokens_counts_what_is_in_memory():
    session, _ = chat(None)
    assert session.context_tokens() == 0
    say(session, "one two three")
    assert session.context_tokens() > 3


def test_commands_parse():
    assert parse_command("/set temp 0.7") == ("set", "temp 0.7")
    assert parse_command("/quit") == ("exit", "")
    assert parse_command("/SYSTEM  Be terse. ") == ("system", "Be terse.")
    assert parse_set("max-tokens 64") == {"max_tokens": 64}
    assert is_command("/help") and not is_command("//etc/passwd is a path") and not is_command("hi /x")
    with pytest.raises(UsageError, match="unknown command /nope"):
        parse_command("/nope")


def make_conversation(store):
    conversation = store.create_conversation("smollm2-135m", "gguf", system_prompt="Be brief.",
                                             sampling=SamplingParams().to_dict())
    store.add_message(conversation.id, "user", "Hi *there*")
    store.add_message(conversation.id, "assistant", "Hello!\n\n```py\nprint(1)\n```", stats={"generated_tokens": 9})
    store.add_message(conversation.id, "user", "More?")
    store.add_message(conversation.id, "assistant", "Sure, here", status="stopped")
    return store.get_conversation(conversation.id)


def test_export_markdown_and_json(store):
    conversation = make_conversation(store)
    messages = store.messages(conversation.id)
    md = export.render(conversation, messages, "md")
    assert md.startswith("# Hi *there*\n")
    assert "## System\n\nBe brief." in md and "## Assistant (stopped)\n\nSure, here\n" in md
    assert "```py\nprint(1)\n```" in md
    data = json.loads(export.render(conversation, messages, "json"))
    assert data["system_prompt"] == "Be brief." and data["model"] == "smollm2-135m"
    assert [m["status"] for m in data["messages"]] == ["complete", "complete", "complete", "stopped"]
    assert data["messages"][1]["stats"] == {"generated_tokens": 9}


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.md"
    target.write_text("old")
    export.write_atomic(target, "new text\n")
    assert target.read_text() == "new text\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.md"]
    with pytest.raises(AlpacaChatError, match="cannot write"):
        export.write_atomic(tmp_path / "missing-dir" / "x.md", "x")


def test_cli_export_to_stdout_and_file(store, capsys, tmp_path):
    conversation = make_conversation(store)
    assert cli.main(["export", str(conversation.id)]) == 0
    assert capsys.readouterr().out.startswith("# Hi *there*")
    assert cli.main(["export", str(conversation.id), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == conversation.id
    target = tmp_path / "c.json"
    assert cli.main(["export", str(conversation.id), "-o", str(target)]) == 0
    assert json.loads(target.read_text())["title"] == "Hi *there*"
    assert cli.main(["export", "999"]) == 1
    assert capsys.readouterr().err.strip() == "alpaca-chat: error: no conversation with id 999"
    assert cli.main(["export", "abc"]) == 2
