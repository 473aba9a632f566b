"""The real app on the real default model, in a real terminal (tmux): ask, watch it stream, quit, resume."""

import shutil
import subprocess
import sys
import time

import pytest

from alpaca_chat.store import Store

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")

QUESTION = "Write a long story about a dragon."


class Tmux:
    def __init__(self, socket):
        self.socket = str(socket)

    def __call__(self, *args, check=True):
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=check)

    def start(self, *app_args):
        command = " ".join([sys.executable, "-m", "alpaca_chat", *app_args])
        self("new-session", "-d", "-x", "120", "-y", "40", "-s", "chat", command)

    def screen(self) -> str:
        result = self("capture-pane", "-p", "-t", "chat", check=False)
        return result.stdout

    def running(self) -> bool:
        return self("has-session", "-t", "chat", check=False).returncode == 0

    def wait_for(self, predicate, timeout=60.0, what="the screen"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def quit(self):
        self("send-keys", "-t", "chat", "C-q")
        deadline = time.monotonic() + 20
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.running(), "the app did not quit on Ctrl+Q"


@pytest.fixture
def tmux(tmp_path):
    session = Tmux(tmp_path / "tmux.sock")
    yield session
    session("kill-server", check=False)


def status_line(screen: str) -> str:
    return next((line for line in screen.splitlines() if "smollm2" in line and "│" in line), "")


def reply_text(screen: str) -> str:
    """The text inside the assistant box, joined."""
    lines, inside = [], False
    for line in screen.splitlines():
        if "assistant" in line and "╭" in line:
            inside, lines = True, []
        elif inside and "╰" in line:
            inside = False
        elif inside:
            lines.append(line.strip(" │"))
    return " ".join(x for x in lines if x)


def test_ask_watch_it_stream_stop_quit_and_resume(tmux, isolated_home):
    tmux.start("--temp", "0", "--max-tokens", "400", "--repeat-penalty", "1.3")
    tmux.wait_for(lambda s: "ready" in status_line(s), what="the model to load")
    tmux("send-keys", "-t", "chat", QUESTION, "Enter")

    # While it generates, the reply grows on screen; Esc stops it.
    partials = []
    deadline = time.monotonic() + 120
    while len(partials) < 3 and time.monotonic() < deadline:
        screen = tmux.screen()
        text = reply_text(screen) if "generating" in status_line(screen) else ""
        if text and (not partials or text != partials[-1]):
            partials.append(text)
        time.sleep(0.03)
    assert len(partials) == 3, f"saw no streaming, only {partials!r}"
    assert all(len(a) < len(b) for a, b in zip(partials, partials[1:]))
    tmux("send-keys", "-t", "chat", "Escape")
    tmux.wait_for(lambda s: "ready" in status_line(s), what="the stop")
    tmux.quit()

    with Store() as store:
        [conversation] = store.list_conversations()
        rows = store.messages(conversation.id)
    assert [(m.role, m.status) for m in rows] == [("user", "complete"), ("assistant", "stopped")]
    assert rows[0].content == QUESTION
    assert rows[1].content.split()[0] == partials[0].split()[0]

    tmux.start("-c")
    restored = tmux.wait_for(lambda s: QUESTION in s and "ready" in status_line(s), what="the restored chat")
    assert " ".join(rows[1].content.split()[-3:]) in " ".join(restored.replace("│", " ").split())
    tmux.quit()
