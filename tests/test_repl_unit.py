"""LineChat's command handling with a real session object over a scripted engine."""

import io

import pytest

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.errors import UsageError
from alpaca_chat.repl import LineChat, parse_set


def test_parse_set_accepts_aliases_and_types():
    assert parse_set("temp 0.3") == {"temperature": 0.3}
    assert parse_set("top-k 12") == {"top_k": 12}
    assert parse_set("seed 9") == {"seed": 9}
    with pytest.raises(UsageError, match="not a valid int"):
        parse_set("top_k many")
    with pytest.raises(UsageError, match="usage: /set"):
        parse_set("volume 11")


class FakeSession:
    def __init__(self):
        self.sampling = SamplingParams()
        self.system = None
        self.new_calls = 0

    def set_system_prompt(self, text):
        self.system = text

    def start_new(self):
        self.new_calls += 1


def test_commands_change_the_session():
    session, out = FakeSession(), io.StringIO()
    chat = LineChat(session, output=out)
    assert chat.handle_command("/set temp 0.25")
    assert session.sampling.temperature == 0.25
    chat.handle_command("/system Be terse.")
    assert session.system == "Be terse."
    chat.handle_command("/new")
    assert session.new_calls == 1
    chat.handle_command("/help")
    assert "/system TEXT" in out.getvalue()
    assert chat.handle_command("/exit") is False
    with pytest.raises(UsageError, match="unknown command /frobnicate"):
        chat.handle_command("/frobnicate")
    with pytest.raises(UsageError, match="temperature"):
        chat.handle_command("/set temp -1")
