"""A KV state copied out of llama.cpp, held until released (`Engine.snapshot()`)."""

import threading
from collections.abc import Callable


class StateSnapshot:
    """`data` (a read-only memoryview of the engine's state buffer) and the `tokens` it holds, valid
    until `release()`; a context manager. `adapter_key` is the LoRA set it was computed under."""

    def __init__(self, data: memoryview, tokens: list[int], release: Callable[[], None] | None = None, *,
                 adapter_key: str = ""):
        self.data, self.tokens, self.adapter_key = data, tokens, adapter_key
        self._release = release
        self._release_lock = threading.Lock()

    def release(self) -> None:
        """Hand the buffer back to its owner (idempotent); `data` is unusable afterwards."""
        with self._release_lock:
            release, self._release = self._release, None
        if release is None:
            return
        try:
            self.data.release()  # a use after this raises instead of reading the next state
        except BufferError:
            pass  # something still exports it (e.g. numpy): that is its caller's business
        release()

    def __enter__(self) -> "StateSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
