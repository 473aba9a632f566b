"""llama.cpp's log for the converter: the chat engine's one callback, silent, to stderr, or to a listener.

llama.cpp has a single process-wide log callback; `alpaca_chat.engine` owns it
(so the chat and the converter never install two). The quantizer listens to it
for progress and for the reason of a failure; everything else stays quiet
unless --verbose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from alpaca_chat import engine

LEVEL_ERROR = 4  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont

Listener = Callable[[int, str], None]


def install(verbose: bool | None = None) -> None:
    """(Re)install the engine's callback; llama.cpp's log is silent unless verbose."""
    engine.configure_logging(verbose)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    with engine.log_listener(listener):
        yield
