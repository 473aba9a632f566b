"""The server's prompt cache on disk: sequence states that outlive the process.

`ContinuousBatch` keeps finished sequences' KV cells while the context has room; this module
keeps them across restarts. Idle sequences are saved (`save`, written by a background thread)
through `kvcache.KVCache` in a directory of their own (`<data dir>/kv/serve/`), with its format,
checks, 0600 files and disk budget (least recently used evicted), keyed by the model, context size,
KV cache type and adapter set (server.adapters: a directory per set). A state's id is a hash of the
tokens it holds; a state whose tokens extend a saved one replaces it.

On startup the saved states' tokens are read (header and tokens only, checked); a request whose
prompt shares the longest prefix with a saved state (`best`) has it loaded (`load`: every check of
kvcache.load before llama.cpp sees a byte) instead of evaluating that prefix again.
"""

import hashlib
import queue
import sys
import threading

from alpaca_chat import kvcache
from alpaca_chat.engine.core import common_prefix

# Prefixes shorter than this are evaluated again rather than saved or read (cheap either way).
MIN_SAVED_TOKENS = 128


def state_id(tokens: list[int]) -> int:
    """A file id for a token sequence (kvcache names files by integer ids)."""
    return int(kvcache.tokens_sha256(tokens)[:14], 16)


class SavedPrefixes:
    """Saved sequence states for one engine: what they hold, and a thread that writes new ones."""

    def __init__(self, cache: kvcache.KVCache, key: kvcache.StateKey, *, min_tokens: int = MIN_SAVED_TOKENS):
        self.cache, self.key, self.min_tokens = cache, key, min_tokens
        self._lock = threading.Lock()
        self.held: dict[int, list[int]] = {}  # state id -> its tokens
        for entry in cache.entries():
            tokens = cache.read_tokens(entry.conversation_id)
            if tokens is not None:
                self.held[entry.conversation_id] = tokens
        self.saved = self.restored = 0
        # One state waiting while one is written: `save` blocks rather than pile up copies in memory.
        self._writes: queue.Queue = queue.Queue(maxsize=1)
        self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-writer", daemon=True)
        self._writer.start()

    @classmethod
    def open(cls, engine, max_mb: int, notice=None) -> "SavedPrefixes | None":
        """The prompt cache of `engine` under its active adapter set (None with a budget of 0, or when
        its directory is unusable). Each adapter set has a directory of its own and a key that names it:
        a state computed under one set is never found, replaced or evicted by another's."""
        if max_mb <= 0:
            return None
        adapters = getattr(engine, "adapter_key", "")
        directory = kvcache.kv_dir() / "serve"
        if adapters:
            directory = directory / f"lora-{hashlib.sha256(adapters.encode()).hexdigest()[:16]}"
        try:
            extra = f"serve\nparallel={engine.n_seq_max > 1}" + (f"\nadapters={adapters}" if adapters else "")
            key = kvcache.state_key(engine.model_path, engine.n_ctx, engine.kv_type, extra)
            return cls(kvcache.KVCache(directory, max_bytes=max_mb * kvcache.MIB), key)
        except OSError as exc:
            (notice or _stderr)(f"prompt cache not used: {exc}")
            return None

    def best(self, tokens: list[int]) -> tuple[int | None, int]:
        """The saved state sharing the longest prefix with `tokens`, and that length."""
        best, best_len = None, 0
        with self._lock:
            for sid, held in self.held.items():
                n = common_prefix(tokens, held)
                if n > best_len:
                    best, best_len = sid, n
        return best, best_len

    def load(self, sid: int) -> kvcache.SavedState | None:
        """A saved state, checked whole; None (and forgotten) when it is gone or invalid."""
        try:
            saved = self.cache.load(sid, self.key)
        except (OSError, kvcache.StateRejected):
            saved = None
        if saved is None or saved.tokens != self.held.get(sid):
            with self._lock:
                self.held.pop(sid, None)
            return None
        self.restored += 1
        return saved

    def has(self, tokens: list[int]) -> bool:
        """Whether `tokens`, or more tokens starting with them, are saved already."""
        with self._lock:
            return any(len(held) >= len(tokens) and held[: len(tokens)] == tokens for held in self.held.values())

    def save(self, tokens: list[int], payload) -> None:
        """Write a state in the background (`payload`: the engine's copy, owned from now on); waits
        while another one is already waiting."""
        self._writes.put((list(tokens), payload))

    def close(self, timeout: float = 60.0) -> None:
        """Finish the writes already asked for."""
        self._writes.put(None)
        self._writer.join(timeout)

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            tokens, payload = item
            sid = state_id(tokens)
            try:
                if not self.cache.save(sid, self.key, tokens, payload):
                    continue  # larger than the whole budget
            except OSError as exc:
                _stderr(f"prompt cache: a state was not saved: {exc}")
                continue
            on_disk = {e.conversation_id for e in self.cache.entries()}
            with self._lock:
                for old, held in list(self.held.items()):  # a prefix of this one, or evicted by the budget
                    if old != sid and (old not in on_disk or tokens[: len(held)] == held):
                        self.held.pop(old)
                        self.cache.delete(old)
                self.held[sid] = tokens
            self.saved += 1


def _stderr(text: str) -> None:
    print(f"alpaca-chat serve: {text}", file=sys.stderr, flush=True)
