"""Chat history in SQLite: this package is the only code that touches the database.

Design choices, and why:

- Conversation ids are INTEGER AUTOINCREMENT so users can type them on the
  command line (`--resume 42`), and a deleted id is never handed out again.
- Every write is one `BEGIN IMMEDIATE ... COMMIT` transaction: it takes the
  write lock up front (so `busy_timeout` applies instead of a lock-upgrade
  failure when two processes write at once), and a `kill -9` loses nothing
  that was committed.
- WAL mode lets a second alpaca-chat read while the first writes.
- Schema changes are named, ordered migration functions recorded in
  `_migrations` (after simonw/llm's migrations.py).
- A corrupt file (checked with `PRAGMA quick_check` on open) is moved aside,
  never deleted, and a fresh database started; `Store.recovered_from` tells
  the caller where the old file went.
- One connection per Store, guarded by a lock, usable from a worker thread
  (the TUI saves streamed replies from one).

The modules: `history.py` is the `Store` (conversations and messages) and its
records; `database.py` configures a connection, runs write transactions, and
detects and moves aside a corrupt file; `migrations.py` is the schema.
"""

from alpaca_chat.store.history import (
    DEFAULT_BUSY_TIMEOUT_MS,
    MEMORY,
    ROLES,
    STATUSES,
    TITLE_MAX_CHARS,
    Conversation,
    Message,
    Store,
    default_title,
)
from alpaca_chat.store.migrations import MIGRATIONS, Migration, migrate, migration

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "MEMORY",
    "MIGRATIONS",
    "ROLES",
    "STATUSES",
    "TITLE_MAX_CHARS",
    "Conversation",
    "Message",
    "Migration",
    "Store",
    "default_title",
    "migrate",
    "migration",
]
