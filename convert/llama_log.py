"""llama.cpp's log, routed through one callback: silent, to stderr, or to a listener.

llama.cpp has a single process-wide log callback. The quantizer listens to it
for progress and for the reason of a failure; everything else stays quiet
unless --verbose.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import llama_cpp

LEVEL_ERROR = 4  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont

Listener = Callable[[int, str], None]
_state: dict = {"callback": None, "verbose": False, "listener": None}


def _on_log(level: int, text: bytes, _user_data) -> None:
    message = text.decode("utf-8", errors="replace")
    if _state["verbose"]:
        sys.stderr.write(message)
        sys.stderr.flush()
    listener = _state["listener"]
    if listener is not None:
        listener(level, message)


def install(verbose: bool | None = None) -> None:
    """(Re)install our callback; llama.cpp's log is silent unless verbose."""
    if verbose is not None:
        _state["verbose"] = verbose
    if _state["callback"] is None:
        # Keep a reference: ctypes frees a callback with its Python object.
        _state["callback"] = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(_state["callback"], ctypes.c_void_p(0))


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    install()
    previous, _state["listener"] = _state["listener"], listener
    try:
        yield
    finally:
        _state["listener"] = previous
