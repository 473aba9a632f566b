"""llama.cpp's one process-wide log callback: silent unless verbose, and listeners for its lines.

A log callback (instead of redirecting file descriptors, as llama-cpp-python's verbose=False does)
never swallows the output of a running full-screen app. The converter listens through it too
(the quantizer's progress and failure reasons), so the chat and the converter never install two.
"""

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator

import llama_cpp

GGML_LOG_LEVEL_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_state = {"verbose": False, "callback": None, "listener": None}


def _on_llama_log(level: int, text: bytes, _user_data) -> None:
    message = text.decode("utf-8", errors="replace")
    if _log_state["verbose"]:
        sys.stderr.write(message)
        sys.stderr.flush()
    listener = _log_state["listener"]
    if listener is not None:
        listener(level, message)


def configure_logging(verbose: bool | None) -> None:
    """Route llama.cpp's log through us: silent unless verbose (None: leave verbosity as it is)."""
    if verbose is not None:
        _log_state["verbose"] = verbose
    if _log_state["callback"] is None:
        # Keep a reference: ctypes callbacks are freed with their Python object.
        _log_state["callback"] = llama_cpp.llama_log_callback(_on_llama_log)
    llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


@contextlib.contextmanager
def log_listener(listener: Callable[[int, str], None]) -> Iterator[None]:
    """Also pass each llama.cpp log line to `listener(level, text)` (e.g. a quantizer's failure reason)."""
    configure_logging(None)
    previous, _log_state["listener"] = _log_state["listener"], listener
    try:
        yield
    finally:
        _log_state["listener"] = previous


@contextlib.contextmanager
def logged_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs inside the block (why a call returned NULL)."""
    errors: list[str] = []
    outer = _log_state["listener"]

    def listen(level: int, text: str) -> None:
        if outer is not None:
            outer(level, text)
        if level == GGML_LOG_LEVEL_ERROR and text.strip():
            errors.append(text.strip())

    with log_listener(listen):
        yield errors
