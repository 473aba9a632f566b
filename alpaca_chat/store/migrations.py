"""The history database's schema, as named, ordered migration functions recorded in `_migrations`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from alpaca_chat.store.database import immediate, utc_now

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema migration. Append only: never reorder or rename one."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            title TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model TEXT NOT NULL,
            template TEXT NOT NULL,
            system_prompt TEXT,
            sampling TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('complete', 'partial', 'stopped', 'error')),
            model TEXT,
            template TEXT,
            sampling TEXT,
            stats TEXT,
            UNIQUE (conversation_id, seq)
        )
        """
    )
    conn.execute("CREATE INDEX conversations_by_update ON conversations (updated_at)")


@migration
def m002_conversation_adapters(conn: sqlite3.Connection) -> None:
    """The LoRA adapters a conversation runs with (JSON list of {"path", "scale"}); existing rows: none."""
    conn.execute("ALTER TABLE conversations ADD COLUMN adapters TEXT NOT NULL DEFAULT '[]'")


def migrate(conn: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply the migrations not yet recorded, in order, in one transaction.

    Returns the names applied. `conn` must be in autocommit mode
    (isolation_level=None). All or nothing: SQLite DDL is transactional, so a
    failing migration leaves the schema as it was.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    if not _pending(conn, migrations):
        return []  # the common case: no write lock taken
    with immediate(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        # Re-read under the write lock: another process may have just migrated.
        pending = _pending(conn, migrations)
        for fn in pending:
            fn(conn)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (fn.__name__, utc_now().isoformat()),
            )
    return [fn.__name__ for fn in pending]


def _pending(conn: sqlite3.Connection, migrations: list[Migration]) -> list[Migration]:
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
    ).fetchone()
    if not has_table:
        return list(migrations)
    applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    return [fn for fn in migrations if fn.__name__ not in applied]

