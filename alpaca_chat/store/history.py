"""The `Store`: conversations and their messages in the history database (see the package docstring)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from alpaca_chat import paths
from alpaca_chat.errors import StoreError
from alpaca_chat.store.database import (
    CorruptDatabase,
    configure,
    immediate,
    is_corruption,
    looks_corrupt,
    move_aside,
    utc_now,
)
from alpaca_chat.store.migrations import migrate

ROLES = ("system", "user", "assistant")
STATUSES = ("complete", "partial", "stopped", "error")
TITLE_MAX_CHARS = 60
MEMORY = ":memory:"
DEFAULT_BUSY_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    created_at: datetime
    updated_at: datetime
    model: str
    template: str
    system_prompt: str | None
    sampling: dict[str, Any]
    # The LoRA adapters it runs with: ({"path": str, "scale": float}, ...), in order.
    adapters: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    seq: int  # 1-based position in the conversation
    role: str  # one of ROLES
    content: str
    created_at: datetime
    status: str  # one of STATUSES
    model: str | None
    template: str | None
    sampling: dict[str, Any] | None
    stats: dict[str, Any] | None


_CONVERSATION_COLUMNS = (
    "id, title, created_at, updated_at, model, template, system_prompt, sampling, adapters"
)
_MESSAGE_COLUMNS = (
    "id, conversation_id, seq, role, content, created_at, status, model, template, sampling, stats"
)


class _Unset:
    """Marks a keyword not passed, so None can mean 'clear this value'."""


_UNSET: Any = _Unset()


class Store:
    """The chat history database. Open it, use it, close it (or use `with`)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        # None means an in-memory database (tests); otherwise the file's path.
        self.path: Path | None = (
            None if str(path) == MEMORY else Path(path or paths.history_db_path())
        )
        self.busy_timeout_ms = busy_timeout_ms
        # Where a corrupt database was moved on open, for the caller to report.
        self.recovered_from: Path | None = None
        self._lock = threading.RLock()
        self._last_now: datetime | None = None
        # Called with the id after a conversation is deleted (e.g. to delete its KV state).
        self.on_delete: list = []
        self._conn = self._open()

    # -- opening -----------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return self._connect_or_raise()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path.parent}: {exc.strerror}") from exc
        if self.path.exists() and looks_corrupt(self.path, self.busy_timeout_ms):
            self.recovered_from = move_aside(self.path)
            return self._connect_or_raise()
        try:
            return self._connect()
        except CorruptDatabase:
            # Corruption the read-only probe could not see (it gives up on locks
            # and hot journals, which only a writable connection can resolve).
            self.recovered_from = move_aside(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open history database {self.path}: {exc}") from exc
        return self._connect_or_raise()

    def _connect_or_raise(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except (CorruptDatabase, sqlite3.Error) as exc:
            raise StoreError(f"cannot open history database {self.path or MEMORY}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path or MEMORY), isolation_level=None, check_same_thread=False
        )
        try:
            configure(conn, self.busy_timeout_ms)
            migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if is_corruption(exc):
                raise CorruptDatabase(str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- conversations -----------------------------------------------------

    def create_conversation(
        self,
        model: str,
        template: str,
        system_prompt: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        title: str | None = None,
        adapters: Sequence[Mapping[str, Any]] = (),
    ) -> Conversation:
        now = self._now()
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO conversations "
                "(title, created_at, updated_at, model, template, system_prompt, sampling, adapters) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (title or "", now, now, model, template, system_prompt, _dump_json(sampling or {}),
                 _dump_adapters(adapters)),
            )
        return self.get_conversation(cursor.lastrowid)

    def get_conversation(self, conversation_id: int) -> Conversation:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return _conversation(row)

    def latest_conversation(self) -> Conversation | None:
        """The most recently active conversation, or None if there are none."""
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def list_conversations(
        self, limit: int | None = 50, query: str | None = None
    ) -> list[Conversation]:
        """Most recently active first. `query` matches title or any message, ignoring case."""
        needle = query.casefold() if query else None
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations AS c "
                "WHERE ?1 IS NULL OR instr(casefold(c.title), ?1) > 0 OR EXISTS ("
                "  SELECT 1 FROM messages AS m"
                "  WHERE m.conversation_id = c.id AND instr(casefold(m.content), ?1) > 0) "
                "ORDER BY c.updated_at DESC, c.id DESC LIMIT ?2",
                (needle, -1 if limit is None else limit),
            ).fetchall()
        return [_conversation(row) for row in rows]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        with self._write() as conn:
            self._require_conversation(conn, conversation_id)
            conn.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                (title, self._now(), conversation_id),
            )

    def update_conversation_settings(
        self,
        conversation_id: int,
        *,
        system_prompt: str | None = _UNSET,
        sampling: Mapping[str, Any] | None = _UNSET,
        model: str = _UNSET,
        template: str = _UNSET,
        adapters: Sequence[Mapping[str, Any]] = _UNSET,
    ) -> Conversation:
        """Change only the settings passed; `system_prompt=None` clears it."""
        changes = {
            name: value
            for name, value in (
                ("system_prompt", system_prompt),
                ("sampling", sampling),
                ("model", model),
                ("template", template),
                ("adapters", adapters),
            )
            if value is not _UNSET
        }
        if "sampling" in changes:
            changes["sampling"] = _dump_json(changes["sampling"] or {})
        if "adapters" in changes:
            changes["adapters"] = _dump_adapters(changes["adapters"])
        changes["updated_at"] = self._now()
        assignments = ", ".join(f"{name} = ?" for name in changes)  # names are fixed above
        with self._write() as conn:
            self._require_conversation(conn, conversation_id)
            conn.execute(
                f"UPDATE conversations SET {assignments} WHERE id = ?",
                (*changes.values(), conversation_id),
            )
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation and (by ON DELETE CASCADE) its messages."""
        with self._write() as conn:
            self._require_conversation(conn, conversation_id)
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        for hook in self.on_delete:
            hook(conversation_id)

    # -- messages ----------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        status: str = "complete",
        model: str | None = None,
        template: str | None = None,
        stats: Mapping[str, Any] | Any = None,
        sampling: Mapping[str, Any] | None = None,
    ) -> int:
        """Append a message and return its id.

        The first user message names an untitled conversation. `stats` may be
        a mapping or a dataclass (stored as JSON).
        """
        _check_choice("role", role, ROLES)
        _check_choice("status", status, STATUSES)
        now = self._now()
        with self._write() as conn:
            title = self._require_conversation(conn, conversation_id)
            seq = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, created_at, "
                "status, model, template, sampling, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, seq, role, content, now, status, model, template,
                 _dump_json(sampling), _dump_json(stats)),
            )
            if role == "user" and not title:
                title = default_title(content)
            conn.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                (title, now, conversation_id),
            )
        return cursor.lastrowid

    def update_message(
        self, message_id: int, content: str, status: str, stats: Mapping[str, Any] | Any = None
    ) -> None:
        """Replace a reply's text and status, e.g. while streaming, then to finalise.

        `stats=None` keeps the stats already stored.
        """
        _check_choice("status", status, STATUSES)
        now = self._now()
        with self._write() as conn:
            row = conn.execute(
                "SELECT conversation_id FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no message with id {message_id}")
            conn.execute(
                "UPDATE messages SET content = ?, status = ?, stats = COALESCE(?, stats) "
                "WHERE id = ?",
                (content, status, _dump_json(stats), message_id),
            )
            conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, row[0]))

    def delete_last_turn(self, conversation_id: int) -> int:
        """Delete the last user message and everything after it; return how many rows went.

        Used to regenerate a reply or to edit the last message and send it again.
        """
        with self._write() as conn:
            self._require_conversation(conn, conversation_id)
            (seq,) = conn.execute(
                "SELECT MAX(seq) FROM messages WHERE conversation_id = ? AND role = 'user'",
                (conversation_id,),
            ).fetchone()
            if seq is None:
                return 0
            cursor = conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND seq >= ?", (conversation_id, seq)
            )
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (self._now(), conversation_id)
            )
        return cursor.rowcount

    def messages(self, conversation_id: int) -> list[Message]:
        """A conversation's messages, in the order they were added."""
        with self._read() as conn:
            self._require_conversation(conn, conversation_id)
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
        return [_message(row) for row in rows]

    # -- helpers -----------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with immediate(self._conn) as conn:
                    yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"could not write history database: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"could not read history database: {exc}") from exc

    @staticmethod
    def _require_conversation(conn: sqlite3.Connection, conversation_id: int) -> str:
        """Return the conversation's title, or raise if there is no such conversation."""
        row = conn.execute(
            "SELECT title FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return row[0]

    def _now(self) -> str:
        """UTC timestamp, strictly increasing per Store.

        "Most recently active" ordering compares these strings; two writes
        within one clock tick must still sort in the order they happened.
        """
        with self._lock:
            now = utc_now()
            if self._last_now is not None and now <= self._last_now:
                now = self._last_now + timedelta(microseconds=1)
            self._last_now = now
        return now.isoformat(timespec="microseconds")



def default_title(content: str) -> str:
    """A conversation title from its first user message: one line, at most TITLE_MAX_CHARS."""
    line = " ".join(content.split())
    if len(line) <= TITLE_MAX_CHARS:
        return line
    return line[: TITLE_MAX_CHARS - 1].rstrip() + "…"


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _dump_json(value: Mapping[str, Any] | Any) -> str | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(dict(value), sort_keys=True)


def _load_json(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _dump_adapters(adapters: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([{"path": str(a["path"]), "scale": float(a["scale"])} for a in adapters or ()])


def _load_adapters(text: str | None) -> tuple[dict[str, Any], ...]:
    """Only well-formed entries: a hand-edited row cannot break opening the conversation."""
    try:
        items = json.loads(text or "[]")
    except json.JSONDecodeError:
        return ()
    if not isinstance(items, list):
        return ()
    return tuple({"path": a["path"], "scale": float(a["scale"])} for a in items
                 if isinstance(a, dict) and isinstance(a.get("path"), str)
                 and isinstance(a.get("scale"), (int, float)) and not isinstance(a.get("scale"), bool))


def _conversation(row: tuple) -> Conversation:
    id_, title, created, updated, model, template, system_prompt, sampling, adapters = row
    return Conversation(
        id=id_,
        title=title,
        created_at=datetime.fromisoformat(created),
        updated_at=datetime.fromisoformat(updated),
        model=model,
        template=template,
        system_prompt=system_prompt,
        sampling=_load_json(sampling) or {},
        adapters=_load_adapters(adapters),
    )


def _message(row: tuple) -> Message:
    (id_, conversation_id, seq, role, content, created, status,
     model, template, sampling, stats) = row
    return Message(
        id=id_,
        conversation_id=conversation_id,
        seq=seq,
        role=role,
        content=content,
        created_at=datetime.fromisoformat(created),
        status=status,
        model=model,
        template=template,
        sampling=_load_json(sampling),
        stats=_load_json(stats),
    )
