"""`alpaca-chat --plain`: prompt-toolkit driven through a real pseudo-terminal, on the real model."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from alpaca_chat.store import Store

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[=>]|\r")


class Terminal:
    """A child process on a pty: type into it, read what it prints."""

    def __init__(self, *args, stdout_is_tty=True, cols=100, rows=30):
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alpaca_chat", *args],
            stdin=slave,
            stdout=slave if stdout_is_tty else subprocess.PIPE,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while not regex.search(self.screen, start):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"process exited waiting for {pattern!r}:\n{self.screen[-2000:]}")
                self.screen += ANSI.sub("", chunk.decode("utf-8", errors="replace"))
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def enter(self, line: str, expect: str = "", timeout: float = 60.0) -> str:
        """Type a line at the prompt; wait for `expect`, then the next prompt; return what came."""
        start = self.mark()
        self.type(line + "\r")
        self.read_until(f"{expect}(.|\\n)*>>>\\s*$", timeout, start=start)
        return self.screen[start:]

    def mark(self) -> int:
        return len(self.screen)

    def close(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit, reading its output so it never blocks on a full pty."""
        deadline = time.monotonic() + timeout
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                if select.select([self.master], [], [], 0.1)[0]:
                    try:
                        self.screen += ANSI.sub("", os.read(self.master, 65536).decode("utf-8", "replace"))
                    except OSError:
                        pass
            return self.proc.wait(timeout=1)
        finally:
            os.close(self.master)


@pytest.fixture
def terminals():
    opened = []
    yield lambda *args, **kw: opened.append(Terminal(*args, **kw)) or opened[-1]
    for term in opened:
        if term.proc.poll() is None:
            os.killpg(term.proc.pid, signal.SIGKILL)
            term.proc.wait()


def saved():
    with Store() as store:
        return [[(m.role, m.content, m.status) for m in store.messages(c.id)] for c in store.list_conversations()]


def test_chat_commands_and_ctrl_d(terminals):
    term = terminals("--plain", "--temp", "0", "--max-tokens", "24")
    term.read_until(r"line mode · smollm2-135m(.|\n)*>>>\s*$")
    shown = term.enter("What is two plus two?", r"two plus two\?\n")
    answer = shown.rsplit("two plus two?", 1)[1].rsplit(">>>", 1)[0].strip()
    assert answer
    [[user, reply]] = saved()
    assert user == ("user", "What is two plus two?", "complete")
    assert reply[0] == "assistant" and reply[2] == "complete" and reply[1].strip() == answer

    term.enter("/set temp 0.5", r"temperature=0\.5")
    term.enter("/set volume 11", r"error: usage: /set NAME VALUE")
    term.enter("/help", r"/model NAME_OR_PATH")
    term.type("\x04")  # Ctrl+D at the prompt quits
    assert term.close() == 0
    with Store() as store:
        assert store.latest_conversation().sampling["temperature"] == 0.5


def test_ctrl_c_stops_a_reply_then_ctrl_c_quits(terminals):
    term = terminals("--plain", "--temp", "0", "--max-tokens", "2000", "--repeat-penalty", "1.3")
    term.read_until(r">>>\s*$")
    start = term.mark()
    term.type("Write a very long story about a dragon.\r")
    term.read_until(r"dragon\.\n.{20,}", start=start)
    term.type("\x03")  # Ctrl+C during the reply stops it
    term.read_until(r"\[stopped\]\n(.|\n)*>>>\s*$", timeout=30, start=start)
    [[_, reply]] = saved()
    assert reply[0] == "assistant" and reply[2] == "stopped" and reply[1]
    term.type("\x03")  # Ctrl+C at the prompt quits
    assert term.close() == 0


def test_continue_shows_the_conversation_and_extends_it(terminals):
    first = terminals("--plain", "--temp", "0", "--max-tokens", "8")
    first.read_until(r">>>\s*$")
    first.enter("My name is Ada.", r"Ada\.\n")
    first.type("\x04")
    assert first.close() == 0
    again = terminals("--plain", "-c", "--max-tokens", "8")
    again.read_until(r">>> My name is Ada\.(.|\n)+>>>\s*$")
    again.type("/exit\r")
    assert again.close() == 0
    [[first_user, _]] = saved()
    assert first_user[1] == "My name is Ada."


def test_stdout_not_a_terminal_uses_line_mode(terminals):
    term = terminals("--max-tokens", "8", stdout_is_tty=False)
    out = term.proc.stdout
    os.set_blocking(out.fileno(), False)
    deadline, seen = time.monotonic() + 60, b""
    while b"line mode" not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
        seen += out.read() or b""
    assert b"line mode" in seen
    time.sleep(0.5)  # let prompt-toolkit take the terminal before Ctrl+D
    term.type("\x04")
    assert term.close() == 0


def test_piped_stdin_is_a_line_per_message_or_command():
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--max-tokens", "8"],
        input="Say hi.\n/set temp 0.5\n/stats\nSay bye.\n",
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "line mode" not in result.stdout and ">>>" not in result.stdout  # replies and command output only
    assert "temperature=0.5" in result.stdout and "tok/s" in result.stdout
    [[hi, first_reply, bye, second_reply]] = saved()
    assert hi[:2] == ("user", "Say hi.") and bye[:2] == ("user", "Say bye.")
    assert first_reply[0] == second_reply[0] == "assistant" and first_reply[1] and second_reply[1]


def test_keys_typed_during_a_reply_are_not_echoed_into_it(terminals):
    term = terminals("--plain", "--temp", "0", "--max-tokens", "300", "--repeat-penalty", "1.3")
    term.read_until(r">>>\s*$")
    start = term.mark()
    term.type("Write a long story about a dragon.\r")
    term.read_until(r"dragon\.\n.{20,}", start=start)
    term.type("zqzq")  # typed ahead while the reply streams
    term.read_until(r"\n>>>", timeout=120, start=start)
    reply = term.screen[start:].split("dragon.\n", 1)[1].split("\n>>>", 1)[0]
    assert "zqzq" not in reply
    term.read_until(r">>>\s*zqzq", timeout=10, start=start)  # typed ahead: waiting at the next prompt
    term.type("\x03")
    assert term.close() == 0


def test_esc_enter_and_alt_enter_insert_a_newline(terminals):
    """Esc, then Enter (two key presses) and Alt+Enter (ESC CR in one write) add a line; Enter sends."""
    term = terminals("--plain", "--temp", "0", "--max-tokens", "4")
    term.read_until(r">>>\s*$")
    term.type("first")
    term.type("\x1b")  # Esc...
    term.read_until(r"first")  # ...handled on its own before Enter arrives
    time.sleep(0.3)  # a separate key press, not an escape sequence (not a timing assert)
    term.type("\r")
    term.type("second\x1b\rthird")  # Alt+Enter
    term.enter("", r"third\n")
    [[user, reply]] = saved()
    assert user == ("user", "first\nsecond\nthird", "complete")
    assert reply[0] == "assistant"
    term.type("\x04")
    assert term.close() == 0
