"""What survives a crash: kill -9 in the middle of a reply, and two processes on one database."""

import os
import select
import signal
import sqlite3
import subprocess
import sys
import time

from alpaca_chat.paths import history_db_path
from alpaca_chat.session import SAVE_INTERVAL_S
from alpaca_chat.store import Store


def start_chat(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "alpaca_chat", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_kill_9_mid_reply_keeps_the_user_message_and_a_partial_reply():
    proc = start_chat("--prompt", "Write a very long story about a dragon.", "--temp", "0",
                      "--max-tokens", "4000", "--repeat-penalty", "1.3")
    shown = proc.stdout.read1(1)
    assert shown, proc.stderr.read().decode()
    # (when read, all text shown by then): the reader sees text after the child wrote it.
    seen: list[tuple[float, bytes]] = [(time.monotonic(), shown)]
    deadline = time.monotonic() + SAVE_INTERVAL_S * 2.5
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.02)[0]:
            shown += os.read(fd, 4096)
            seen.append((time.monotonic(), shown))
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    raw = sqlite3.connect(history_db_path())
    assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    raw.close()
    with Store() as store:
        assert store.recovered_from is None
        [conversation] = store.list_conversations()
        user, reply = store.messages(conversation.id)
    assert (user.role, user.content, user.status) == ("user", "Write a very long story about a dragon.", "complete")
    assert reply.role == "assistant" and reply.status == "partial"
    assert reply.content and shown.decode(errors="replace").startswith(reply.content)
    # The promise: at most one second of the reply is lost. Everything shown a second before the
    # kill is saved (the saver runs every half second, so this holds with room to spare).
    shown_a_second_before = max((text for at, text in seen if at <= killed_at - SAVE_INTERVAL_S), key=len)
    assert reply.content.encode().startswith(shown_a_second_before), (len(reply.content), len(shown_a_second_before))


def test_two_processes_on_one_database_lose_nothing():
    prompts = ["Name a fruit.", "Name a color."]  # one thread each: two cores, two processes
    procs = [start_chat("--prompt", p, "--max-tokens", "24", "--temp", "0", "--threads", "1") for p in prompts]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    with Store() as store:
        conversations = store.list_conversations()
        saved = sorted([(m.role, m.content, m.status) for m in store.messages(c.id)] for c in conversations)
    assert [rows[0][1] for rows in saved] == sorted(prompts)
    for rows in saved:
        assert [(role, status) for role, _, status in rows] == [("user", "complete"), ("assistant", "complete")]
        assert rows[1][1]
