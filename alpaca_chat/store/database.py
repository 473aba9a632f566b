"""The history database file: connection settings, write transactions, corruption and recovery."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from alpaca_chat.errors import StoreError

# Files SQLite keeps beside the database; they travel with it when it is moved aside.
_SIBLING_SUFFIXES = ("-wal", "-shm", "-journal")


class CorruptDatabase(Exception):
    """Internal: the file is not a usable SQLite database."""


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the write lock from its start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        # Some errors (disk full, I/O) already rolled back inside SQLite.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def configure(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Per-connection settings: busy timeout, foreign keys, WAL, and the casefold() SQL function."""
    # First, because the statements after it may have to wait for a lock.
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")  # per connection; needed for ON DELETE CASCADE
    _enable_wal(conn, busy_timeout_ms)
    conn.create_function("casefold", 1, _casefold, deterministic=True)


def _enable_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Switch the file to WAL (a persistent mode: a no-op once done).

    Switching needs an exclusive lock, and when two processes open a new
    database at once SQLite answers "database is locked" at once rather than
    wait in the busy handler (which could deadlock). So retry, for as long as
    the busy timeout allows.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def looks_corrupt(path: Path, busy_timeout_ms: int) -> bool:
    """True if the database at `path` is not SQLite or fails `PRAGMA quick_check`.

    The probe is read-only: a writable connection to a corrupt file would, on
    close, checkpoint into it and delete its -wal, and the file must be moved
    aside exactly as it was. Failures that are not corruption (locked, no
    permission, a hot journal to roll back) are left for the real open.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            return conn.execute("PRAGMA quick_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError as exc:
        return is_corruption(exc)


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """True for SQLITE_CORRUPT / SQLITE_NOTADB ("file is not a database", "malformed").

    Python raises exactly DatabaseError for those; busy, locked, I/O and
    permission errors are OperationalError and must not get a healthy
    database moved aside.
    """
    return type(exc) is sqlite3.DatabaseError


def move_aside(path: Path) -> Path:
    """Rename a corrupt database (and its -wal/-shm) to <name>.corrupt-<UTC time>."""
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while any(Path(f"{target}{suffix}").exists() for suffix in ("", *_SIBLING_SUFFIXES)):
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    try:
        path.rename(target)
        for suffix in _SIBLING_SUFFIXES:
            sibling = Path(f"{path}{suffix}")
            if sibling.exists():
                sibling.rename(f"{target}{suffix}")
    except OSError as exc:
        raise StoreError(
            f"history database {path} is corrupt and could not be moved aside: {exc}"
        ) from exc
    return target



def _casefold(text: str | None) -> str | None:
    return None if text is None else text.casefold()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)

