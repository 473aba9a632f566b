"""Tests for the history store: migrations, CRUD, corruption recovery, concurrency, crashes."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from alpaca_chat import paths
from alpaca_chat.errors import StoreError
from alpaca_chat.store import MIGRATIONS, TITLE_MAX_CHARS, Store, migrate

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "history.db"


@pytest.fixture
def store(db_path):
    with Store(db_path) as opened:
        yield opened


def _message(store, message_id):
    """The stored message with this id, found through the public listings (the Store has no lookup by id)."""
    for conversation in store.list_conversations(limit=None):
        for message in store.messages(conversation.id):
            if message.id == message_id:
                return message
    raise AssertionError(f"no message with id {message_id} in the store")


def _raw(path):
    """A plain connection, to look at the file without going through Store."""
    return sqlite3.connect(path, isolation_level=None)


# -- migrations -----------------------------------------------------------


def _memory_conn():
    return sqlite3.connect(":memory:", isolation_level=None)


def _recorded(conn):
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def _tables(conn):
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_migrations_apply_in_order_on_memory_db():
    conn = _memory_conn()
    applied = migrate(conn)
    names = [fn.__name__ for fn in MIGRATIONS]
    assert applied == names
    assert _recorded(conn) == names
    assert {"conversations", "messages", "_migrations"} <= _tables(conn)


def test_migrate_twice_applies_nothing_the_second_time():
    conn = _memory_conn()
    migrate(conn)
    before = conn.execute("SELECT name, applied_at FROM _migrations").fetchall()
    assert migrate(conn) == []
    assert conn.execute("SELECT name, applied_at FROM _migrations").fetchall() == before


def test_only_new_migrations_run_in_list_order():
    calls = []

    def m1_first(conn):
        calls.append("m1_first")
        conn.execute("CREATE TABLE a (x)")

    def m2_second(conn):
        calls.append("m2_second")
        conn.execute("ALTER TABLE a ADD COLUMN y")  # fails unless m1 ran before

    def m3_third(conn):
        calls.append("m3_third")
        conn.execute("CREATE TABLE c (z)")

    conn = _memory_conn()
    assert migrate(conn, [m1_first, m2_second]) == ["m1_first", "m2_second"]
    assert migrate(conn, [m1_first, m2_second, m3_third]) == ["m3_third"]
    assert calls == ["m1_first", "m2_second", "m3_third"]
    assert _recorded(conn) == ["m1_first", "m2_second", "m3_third"]


def test_failing_migration_leaves_schema_untouched():
    def m1_ok(conn):
        conn.execute("CREATE TABLE kept_only_if_all_succeed (x)")

    def m2_broken(conn):
        conn.execute("THIS IS NOT SQL")

    conn = _memory_conn()
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, [m1_ok, m2_broken])
    assert "kept_only_if_all_succeed" not in _tables(conn)
    assert migrate(conn, [m1_ok]) == ["m1_ok"]


def test_memory_store_is_migrated():
    with Store(":memory:") as store:
        conversation = store.create_conversation("m", "chatml")
        assert store.get_conversation(conversation.id) == conversation
        assert store.path is None


def test_reopening_a_file_db_does_not_reapply_migrations(db_path):
    Store(db_path).close()
    before = _raw(db_path).execute("SELECT name, applied_at FROM _migrations").fetchall()
    assert [name for name, _ in before] == [fn.__name__ for fn in MIGRATIONS]
    Store(db_path).close()
    assert _raw(db_path).execute("SELECT name, applied_at FROM _migrations").fetchall() == before


# -- opening --------------------------------------------------------------


def test_file_db_is_in_wal_mode_with_busy_timeout_and_foreign_keys(store, db_path):
    assert _raw(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # Per-connection settings can only be seen on the store's own connection.
    assert store._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_default_path_follows_alpaca_chat_home_and_is_created_on_open(isolated_home):
    expected = paths.history_db_path()
    assert expected.is_relative_to(isolated_home)
    assert not expected.parent.exists()  # importing the module created nothing
    with Store() as store:
        assert store.path == expected
    assert expected.is_file()


# -- conversations and messages --------------------------------------------


def test_create_and_get_conversation(store):
    created = store.create_conversation(
        "qwen-0.5b", "chatml", system_prompt="Be brief.", sampling={"temperature": 0.2}, title="T"
    )
    assert (created.model, created.template, created.system_prompt) == ("qwen-0.5b", "chatml", "Be brief.")
    assert (created.title, created.sampling) == ("T", {"temperature": 0.2})
    assert created.created_at == created.updated_at
    assert store.get_conversation(created.id) == created
    assert store.create_conversation("m", "alpaca").id != created.id


def test_messages_come_back_in_order_with_their_metadata(store):
    conversation = store.create_conversation("m", "alpaca")
    store.add_message(conversation.id, "system", "You are terse.")
    store.add_message(conversation.id, "user", "Hi")
    reply_id = store.add_message(
        conversation.id,
        "assistant",
        "Hello",
        model="smol.gguf",
        template="chatml",
        sampling={"top_p": 0.9},
        stats={"prompt_tokens": 7, "stop_reason": "eos"},
    )
    messages = store.messages(conversation.id)
    assert [(m.seq, m.role, m.content) for m in messages] == [
        (1, "system", "You are terse."),
        (2, "user", "Hi"),
        (3, "assistant", "Hello"),
    ]
    reply = messages[-1]
    assert reply.id == reply_id and reply == _message(store, reply_id)
    assert (reply.model, reply.template, reply.status) == ("smol.gguf", "chatml", "complete")
    assert reply.sampling == {"top_p": 0.9}
    assert reply.stats == {"prompt_tokens": 7, "stop_reason": "eos"}
    assert messages[1].stats is None and messages[1].model is None


def test_stats_may_be_a_dataclass(store):
    @dataclass
    class Stats:
        generated_tokens: int
        generation_tokens_per_s: float

    conversation = store.create_conversation("m", "alpaca")
    message_id = store.add_message(conversation.id, "assistant", "ok", stats=Stats(3, 12.5))
    assert _message(store, message_id).stats == {"generated_tokens": 3, "generation_tokens_per_s": 12.5}


def test_first_user_message_titles_an_untitled_conversation(store):
    conversation = store.create_conversation("m", "alpaca")
    store.add_message(conversation.id, "system", "system text is not a title")
    long_question = "Explain   the\nrules of chess " + "in great detail " * 10
    store.add_message(conversation.id, "user", long_question)
    store.add_message(conversation.id, "user", "second question")
    title = store.get_conversation(conversation.id).title
    assert len(title) <= TITLE_MAX_CHARS
    assert title.startswith("Explain the rules of chess in great detail")
    assert title.endswith("…")


def test_an_explicit_title_is_kept(store):
    conversation = store.create_conversation("m", "alpaca", title="Chess")
    store.add_message(conversation.id, "user", "What is castling?")
    assert store.get_conversation(conversation.id).title == "Chess"


def test_rename_and_update_settings(store):
    conversation = store.create_conversation("m", "alpaca", system_prompt="old", sampling={"temperature": 1.0})
    store.rename_conversation(conversation.id, "Renamed")
    updated = store.update_conversation_settings(conversation.id, sampling={"temperature": 0.1}, model="m2")
    assert updated.title == "Renamed"
    assert (updated.model, updated.template, updated.system_prompt) == ("m2", "alpaca", "old")
    assert updated.sampling == {"temperature": 0.1}
    cleared = store.update_conversation_settings(conversation.id, system_prompt=None, template="chatml")
    assert (cleared.system_prompt, cleared.template, cleared.model) == (None, "chatml", "m2")
    assert cleared.updated_at > conversation.updated_at


def test_partial_reply_is_saved_then_finalised(store):
    conversation = store.create_conversation("m", "alpaca")
    store.add_message(conversation.id, "user", "Count to three")
    reply_id = store.add_message(conversation.id, "assistant", "", status="partial", model="m")
    store.update_message(reply_id, "one, two", "partial")
    assert (_message(store, reply_id).content, _message(store, reply_id).status) == ("one, two", "partial")
    stats = {"generated_tokens": 5, "time_to_first_token_s": 0.1, "stop_reason": "eos"}
    store.update_message(reply_id, "one, two, three", "complete", stats=stats)
    reply = _message(store, reply_id)
    assert (reply.content, reply.status, reply.stats, reply.model) == ("one, two, three", "complete", stats, "m")
    store.update_message(reply_id, "one, two, three", "stopped")  # no stats: keep the ones stored
    assert _message(store, reply_id).stats == stats
    assert [m.id for m in store.messages(conversation.id)].count(reply_id) == 1


def test_conversations_are_listed_most_recently_active_first(store):
    first = store.create_conversation("m", "alpaca", title="first")
    second = store.create_conversation("m", "alpaca", title="second")
    third = store.create_conversation("m", "alpaca", title="third")
    assert [c.id for c in store.list_conversations()] == [third.id, second.id, first.id]
    store.add_message(first.id, "user", "back to the first one")
    assert [c.id for c in store.list_conversations()] == [first.id, third.id, second.id]
    assert [c.id for c in store.list_conversations(limit=2)] == [first.id, third.id]
    assert store.latest_conversation().id == first.id


def test_latest_conversation_is_none_when_empty(store):
    assert store.latest_conversation() is None
    assert store.list_conversations() == []


def test_query_filters_on_title_and_content_ignoring_case(store):
    about_chess = store.create_conversation("m", "alpaca", title="Chess openings")
    about_school = store.create_conversation("m", "alpaca", title="Homework")
    store.add_message(about_school.id, "user", "Mon ÉCOLE est fermée")
    unrelated = store.create_conversation("m", "alpaca", title="Weather")
    store.add_message(unrelated.id, "user", "Will it rain?")

    assert [c.id for c in store.list_conversations(query="CHESS")] == [about_chess.id]
    assert [c.id for c in store.list_conversations(query="école")] == [about_school.id]
    assert store.list_conversations(query="50%_off") == []  # LIKE wildcards are literal here
    assert len(store.list_conversations(query="")) == 3


def test_delete_conversation_cascades_to_its_messages(store, db_path):
    doomed = store.create_conversation("m", "alpaca")
    kept = store.create_conversation("m", "alpaca")
    for text in ("a", "b"):
        store.add_message(doomed.id, "user", text)
        store.add_message(kept.id, "user", text)
    store.delete_conversation(doomed.id)
    counts = dict(_raw(db_path).execute("SELECT conversation_id, COUNT(*) FROM messages GROUP BY 1"))
    assert counts == {kept.id: 2}
    with pytest.raises(StoreError, match=f"no conversation with id {doomed.id}"):
        store.get_conversation(doomed.id)


def test_deleted_ids_are_not_reused(store):
    doomed = store.create_conversation("m", "alpaca")
    store.delete_conversation(doomed.id)
    assert store.create_conversation("m", "alpaca").id > doomed.id


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get_conversation(42),
        lambda s: s.messages(42),
        lambda s: s.add_message(42, "user", "hi"),
        lambda s: s.rename_conversation(42, "x"),
        lambda s: s.delete_conversation(42),
        lambda s: s.update_conversation_settings(42, model="m"),
    ],
)
def test_unknown_conversation_is_a_store_error(store, call):
    with pytest.raises(StoreError, match="^no conversation with id 42$"):
        call(store)


def test_unknown_message_is_a_store_error(store):
    with pytest.raises(StoreError, match="^no message with id 7$"):
        store.update_message(7, "x", "complete")


def test_bad_role_or_status_is_rejected_before_writing(store):
    conversation = store.create_conversation("m", "alpaca")
    with pytest.raises(ValueError, match="role"):
        store.add_message(conversation.id, "robot", "x")
    with pytest.raises(ValueError, match="status"):
        store.add_message(conversation.id, "assistant", "x", status="done")
    assert store.messages(conversation.id) == []


def test_store_is_usable_from_another_thread(store):
    conversation = store.create_conversation("m", "alpaca")
    errors = []

    def worker():
        try:
            store.add_message(conversation.id, "assistant", "from a worker")
        except Exception as exc:  # surfaced to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == []
    assert [m.content for m in store.messages(conversation.id)] == ["from a worker"]


# -- corruption -----------------------------------------------------------


def _corrupt_copies(db_path):
    return sorted(p for p in db_path.parent.iterdir() if ".corrupt-" in p.name)


def test_garbage_file_is_moved_aside_and_a_fresh_db_started(db_path):
    db_path.parent.mkdir(parents=True)
    garbage = os.urandom(64) + b"this is not a database" * 500
    wal_garbage = b"stray wal bytes" * 10
    db_path.write_bytes(garbage)
    Path(f"{db_path}-wal").write_bytes(wal_garbage)

    with Store(db_path) as store:
        moved = store.recovered_from
        assert moved is not None and moved.name.startswith("history.db.corrupt-")
        assert moved.read_bytes() == garbage
        assert Path(f"{moved}-wal").read_bytes() == wal_garbage
        conversation = store.create_conversation("m", "alpaca")
        store.add_message(conversation.id, "user", "fresh start")
        assert [m.content for m in store.messages(conversation.id)] == ["fresh start"]
    assert _raw(db_path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_damaged_pages_are_caught_by_quick_check(db_path):
    with Store(db_path) as store:
        conversation = store.create_conversation("m", "alpaca")
        for i in range(200):
            store.add_message(conversation.id, "user", f"{i} " + "x" * 500)
    data = bytearray(db_path.read_bytes())
    page_size = 4096
    data[5 * page_size : 8 * page_size] = b"\xa5" * (3 * page_size)  # header intact, b-tree pages not
    db_path.write_bytes(bytes(data))

    with Store(db_path) as store:
        assert store.recovered_from is not None
        assert store.recovered_from.read_bytes() == bytes(data)
        assert store.list_conversations() == []


def test_a_corrupt_db_with_a_live_wal_is_moved_aside_untouched(tmp_path, db_path):
    # Snapshot a database and its un-checkpointed -wal as a crash would leave them.
    source = tmp_path / "source.db"
    writer = _raw(source)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE t (x)")
    for _ in range(300):
        writer.execute("INSERT INTO t VALUES (?)", ("x" * 500,))
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.execute("INSERT INTO t VALUES ('only in the wal')")
    db_path.parent.mkdir(parents=True)
    main = bytearray(source.read_bytes())
    main[5 * 4096 : 8 * 4096] = b"\xa5" * (3 * 4096)
    db_path.write_bytes(bytes(main))
    wal = Path(f"{source}-wal").read_bytes()
    assert wal, "the snapshot must have a non-empty -wal for this test to mean anything"
    Path(f"{db_path}-wal").write_bytes(wal)
    writer.close()

    with Store(db_path) as store:
        moved = store.recovered_from
        assert moved is not None
        # A writable connection would have checkpointed into the file and deleted the -wal.
        assert moved.read_bytes() == bytes(main)
        assert Path(f"{moved}-wal").read_bytes() == wal


def test_a_second_recovery_in_the_same_second_does_not_overwrite_the_first(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"garbage one" * 100)
    Store(db_path).close()
    db_path.write_bytes(b"garbage two" * 100)
    Store(db_path).close()
    databases = [p for p in _corrupt_copies(db_path) if not p.name.endswith(("-wal", "-shm", "-journal"))]
    assert sorted(p.read_bytes()[:11] for p in databases) == [
        b"garbage one",
        b"garbage two",
    ]


def test_a_healthy_db_is_left_in_place(db_path):
    with Store(db_path) as store:
        conversation = store.create_conversation("m", "alpaca")
        store.add_message(conversation.id, "user", "keep me")
    with Store(db_path) as store:
        assert store.recovered_from is None
        assert [m.content for m in store.messages(conversation.id)] == ["keep me"]
    assert _corrupt_copies(db_path) == []


def test_a_locked_db_is_an_error_not_corruption(db_path):
    db_path.parent.mkdir(parents=True)
    holder = _raw(db_path)
    holder.execute("PRAGMA journal_mode = DELETE")
    holder.execute("CREATE TABLE other_app (x)")
    holder.execute("BEGIN EXCLUSIVE")  # in rollback-journal mode this blocks readers too
    try:
        with pytest.raises(StoreError, match="cannot open history database"):
            Store(db_path, busy_timeout_ms=50)
    finally:
        holder.execute("ROLLBACK")
    assert _corrupt_copies(db_path) == []
    assert "other_app" in _tables(_raw(db_path))


# -- several processes ----------------------------------------------------

# Opens the store after a go signal on stdin, so that the processes race. The
# short pause between writes paces them like a person chatting: back to back,
# one process re-takes the lock before the other's busy handler wakes up, and
# the writes would not overlap at all.
WRITER = textwrap.dedent(
    """
    import sys
    import time
    from alpaca_chat.store import Store

    db, conversation, count, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print("ready", flush=True)
    sys.stdin.readline()
    with Store(db) as store:
        if conversation == "new":
            conversation = store.create_conversation("m", "alpaca", title=tag).id
        for i in range(count):
            store.add_message(int(conversation), "user", f"{tag}-{i}")
            time.sleep(0.001)
    """
)


def _python(code, *args, **popen_kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], env=env, text=True, **popen_kwargs
    )


def _run_writers_together(db_path, conversation, count):
    writers = [
        _python(WRITER, db_path, conversation, count, tag, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for tag in ("a", "b")
    ]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        assert writer.wait(timeout=120) == 0


def test_two_processes_writing_one_conversation_lose_nothing(store, db_path):
    count = 150
    conversation = store.create_conversation("m", "alpaca")
    _run_writers_together(db_path, conversation.id, count)

    messages = store.messages(conversation.id)
    assert sorted(m.content for m in messages) == sorted(f"{t}-{i}" for t in "ab" for i in range(count))
    assert [m.seq for m in messages] == list(range(1, 2 * count + 1))
    for tag in "ab":  # each process's own messages stay in the order it wrote them
        mine = [m.content for m in messages if m.content.startswith(tag)]
        assert mine == [f"{tag}-{i}" for i in range(count)]
    tags = [m.content[0] for m in messages]
    switches = sum(1 for x, y in zip(tags, tags[1:]) if x != y)
    assert switches > 1, "the writers did not overlap, so this test proved nothing"


def test_two_processes_creating_a_fresh_db_at_once(db_path):
    count = 50
    _run_writers_together(db_path, "new", count)

    with Store(db_path) as store:
        conversations = store.list_conversations()
        assert sorted(c.title for c in conversations) == ["a", "b"]
        for conversation in conversations:
            assert len(store.messages(conversation.id)) == count
    assert _recorded(_raw(db_path)) == [fn.__name__ for fn in MIGRATIONS]


# Prints each message id once add_message has returned, i.e. once it is committed.
LOOPING_WRITER = textwrap.dedent(
    """
    import sys
    from alpaca_chat.store import Store

    with Store(sys.argv[1]) as store:
        i = 0
        while True:
            message_id = store.add_message(int(sys.argv[2]), "user", f"{i}:" + "x" * 20000)
            print(message_id, i, flush=True)
            i += 1
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_write_keeps_every_committed_row(store, db_path):
    conversation = store.create_conversation("m", "alpaca")
    writer = _python(LOOPING_WRITER, db_path, conversation.id, stdout=subprocess.PIPE)
    committed = {}
    try:
        while len(committed) < 60:
            line = writer.stdout.readline()
            assert line, "writer died before it was killed"
            message_id, i = map(int, line.split())
            committed[message_id] = i
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    check = _raw(db_path)
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    rows = dict(check.execute("SELECT id, content FROM messages"))
    for message_id, i in committed.items():
        assert rows[message_id] == f"{i}:" + "x" * 20000
    with Store(db_path) as reopened:
        assert reopened.recovered_from is None
        assert len(reopened.messages(conversation.id)) == len(rows) >= len(committed)
