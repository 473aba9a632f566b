"""Saved KV states, one file per conversation: instant resume of a long chat.

This module owns the files: where they live (`<user data dir>/kv/`), their
header and checksums, validation, the disk budget and its LRU eviction. It
never sees llama.cpp: the engine makes and loads the payload, the session
decides when.

A state file is never trusted: `kvcache_format` (the file's bytes, `StateKey`) checks everything
in it, in Python, before the engine hands a byte to llama.cpp (whose state loader has had a heap
overflow on crafted files), and that it was made for this model, context size, KV cache type,
template and LoRA adapter set. Anything else is `StateRejected`, which callers treat as "no state".
"""

import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from alpaca_chat import atomic, paths
from alpaca_chat.kvcache_format import (  # noqa: F401 - the format's names are kvcache's API too
    MAGIC, MAX_HEADER_BYTES, MAX_TOKENS, MODEL_HASH_HEAD, MODEL_HASH_TAIL, VERSION, StateKey, StateRejected,
    _decode_tokens, _Decoded, _peek_tokens, _read_token_count, check_key, decode, encode, encode_header, state_key,
    tokens_sha256,
)

SUFFIX = ".kv"
DEFAULT_MAX_MB = 2048
MIB = 1024 * 1024
# A temp file older than this is left over from a killed save.
STALE_TEMP_S = 600.0


@dataclass
class SavedState:
    conversation_id: int
    tokens: list[int]
    payload: bytearray  # writable: the engine hands it to llama.cpp without a copy


@dataclass
class Entry:
    """One file of the cache, for `alpaca-chat --kv-cache`."""

    conversation_id: int
    path: Path
    size: int
    tokens: int
    last_used: float


def kv_dir() -> Path:
    return paths.data_dir() / "kv"


class KVCache:
    """The directory of state files, kept under `max_bytes` by evicting the least recently used."""

    def __init__(self, directory: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_MB * MIB):
        self.directory = Path(directory) if directory is not None else kv_dir()
        self.max_bytes = max_bytes
        self._prefetched: dict[int, _Prefetch] = {}

    def path_for(self, conversation_id: int) -> Path:
        return self.directory / f"{int(conversation_id)}{SUFFIX}"

    # -- writing ---------------------------------------------------------------

    def save(self, conversation_id: int, key: StateKey, tokens: list[int], payload) -> int:
        """Write a state atomically (temp file, fsync, rename), mode 0600; return its size.

        `payload` is any bytes-like object (the engine's snapshot is a memoryview): it is
        checksummed and written as it is, after the header, never copied. A state larger
        than the whole budget is not kept. Raises OSError when the directory cannot be
        written: the old file, or none, stays.
        """
        head = encode_header(conversation_id, key, tokens, payload)
        size = len(head) + memoryview(payload).nbytes
        target = self.path_for(conversation_id)
        if size > self.max_bytes:
            self.delete(conversation_id)
            return 0
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Replaces a symlink itself, never what it points to.
        atomic.write_atomic(target, [head, payload], mode=0o600)
        self.evict(keep=conversation_id)
        return size

    # -- reading ---------------------------------------------------------------

    def load(self, conversation_id: int, key: StateKey) -> SavedState | None:
        """The saved state of a conversation, None when there is none.

        Raises StateRejected for a file that is not a valid state for `key`.
        """
        path = self.path_for(conversation_id)
        prefetched = self._prefetched.pop(conversation_id, None)
        saved = prefetched.result(path) if prefetched is not None else None
        if saved is None:
            read = _read_state(path)
            if read is None:
                return None
            saved = read[1]
        if saved.conversation_id != conversation_id:
            raise StateRejected(f"{path.name}: made for conversation {saved.conversation_id}")
        check_key(saved.header, key, path.name)
        try:
            os.utime(path)  # least recently used = oldest modification time
        except OSError:
            pass
        return SavedState(conversation_id, saved.tokens, saved.payload)

    def prefetch(self, conversation_id: int) -> None:
        """Start reading and checking a conversation's state file in a thread, so that a new
        process reads it while its model loads; `load` then takes what was read if the file is
        still the same one (device, inode, size, modification time), and reads it again if not."""
        if conversation_id not in self._prefetched:
            self._prefetched[conversation_id] = _Prefetch(self.path_for(conversation_id))

    def peek_tokens(self, conversation_id: int) -> int:
        """How many tokens a conversation's state file says it holds, from its header alone (0: none,
        or unreadable). Not a check: only to skip reading a file that cannot give more than what
        the engine already holds (`load` checks everything)."""
        try:
            fd = os.open(self.path_for(conversation_id), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return 0
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return 0
            return _read_token_count(f)

    def read_tokens(self, state_id: int) -> list[int] | None:
        """A state file's tokens, checked but not its payload (to choose; `load` checks all); None: invalid."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            with os.fdopen(os.open(self.path_for(state_id), flags), "rb") as f:
                info = os.fstat(f.fileno())
                return _decode_tokens(f, info.st_size, "state")[1] if stat.S_ISREG(info.st_mode) else None
        except (OSError, StateRejected):
            return None

    # -- the budget --------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """The state files, most recently used first (a file's token count read from its header)."""
        found = []
        try:
            names = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        for path in names:
            if path.suffix != SUFFIX or not path.stem.isdigit() or path.is_symlink():
                continue
            try:
                st = path.stat()
                tokens = _peek_tokens(path)
            except OSError:
                continue
            found.append(Entry(int(path.stem), path, st.st_size, tokens, st.st_mtime))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: int | None = None) -> list[int]:
        """Delete the least recently used files until the cache fits its budget."""
        self._remove_stale_temps()
        entries = self.entries()
        total = sum(e.size for e in entries)
        evicted = []
        for entry in reversed(entries):  # oldest first
            if total <= self.max_bytes:
                break
            if entry.conversation_id == keep:
                continue
            _unlink(entry.path)
            total -= entry.size
            evicted.append(entry.conversation_id)
        return evicted

    def delete(self, conversation_id: int) -> None:
        _unlink(self.path_for(conversation_id))

    def clear(self) -> int:
        """Delete every state file (and leftover temp files); return how many states went."""
        entries = self.entries()
        for entry in entries:
            _unlink(entry.path)
        self._remove_stale_temps(max_age_s=0.0)
        return len(entries)

    def _remove_stale_temps(self, max_age_s: float = STALE_TEMP_S) -> None:
        try:
            names = list(self.directory.glob(f".*{SUFFIX}.*.tmp"))
        except OSError:
            return
        now = time.time()
        for path in names:
            try:
                if now - path.lstat().st_mtime >= max_age_s:
                    path.unlink()
            except OSError:
                pass


def _read_state(path: Path) -> tuple[tuple, "_Decoded"] | None:
    """A state file's identity and its checked contents; None when there is none. Never follows
    a symlink; StateRejected for anything that is not a whole, regular state file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateRejected(f"{path.name}: cannot be opened ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StateRejected(f"{path.name}: not a regular file")
        return _identity(info), decode(f, info.st_size, path.name)


def _identity(info: os.stat_result) -> tuple:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class _Prefetch:
    """One state file read and checked in a daemon thread (KVCache.prefetch)."""

    def __init__(self, path: Path):
        self._read: tuple | None = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, args=(path,), name="kv-state-prefetch", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._read = _read_state(path)
        except Exception:  # noqa: BLE001 - load() reads the file again and says why
            self._failed = True

    def result(self, path: Path) -> "_Decoded | None":
        """What was read, if `path` is still that file (None: read it again)."""
        self._thread.join()
        if self._failed or self._read is None:
            return None
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        identity, decoded = self._read
        return decoded if stat.S_ISREG(info.st_mode) and _identity(info) == identity else None


def delete_conversation_state(conversation_id: int) -> None:
    """Deleting a conversation deletes its state (the store's deletion hook)."""
    try:
        KVCache().delete(conversation_id)
    except OSError:
        pass  # an unreadable kv/ directory: the conversation is deleted all the same


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def format_usage(entries: list[Entry], titles: dict[int, str]) -> str:
    """The `alpaca-chat --kv-cache` table."""
    if not entries:
        return "No saved KV states."
    lines = [f"{'ID':>5}  {'TOKENS':>7}  {'SIZE':>9}  {'LAST USED':<16}  TITLE"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        lines.append(f"{e.conversation_id:>5}  {e.tokens:>7}  {e.size / MIB:>7.1f}MB  {used:<16}  "
                     f"{titles.get(e.conversation_id, '(deleted)')}")
    total = sum(e.size for e in entries)
    lines.append(f"{len(entries)} state(s), {total / MIB:.1f} MB")
    return "\n".join(lines)
