"""Write an output file atomically: to a temp file beside it, fsynced, renamed at the end.

A crash, Ctrl+C or a full disk leaves the destination untouched (no partial
`.gguf` that llama.cpp would later choke on): the temp file is removed on any
exception and only a complete file is renamed into place with `os.replace`.
"""

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alpaca_chat.atomic import atomic_path
from alpaca_chat.errors import ConversionError


class OutputError(ConversionError):
    """The output file cannot be written (missing directory, permissions, full disk)."""


_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def check_writable(path: Path) -> None:
    """Fail early, before any long work, if `path` cannot be created."""
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not parent.exists():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: permission denied in {parent}")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path in the destination's directory; rename it to `path` on success."""
    final = Path(path)
    check_writable(final)
    try:
        # alpaca_chat.atomic is the one atomic writer: temp file, fsync, rename, directory fsync.
        with atomic_path(final, suffix=".partial") as tmp:
            yield tmp
    except OSError as exc:
        if exc.errno in _DISK_ERRORS:
            raise _output_error(final, exc) from exc
        raise


def _output_error(final: Path, exc: OSError) -> OutputError:
    reason = _DISK_ERRORS.get(exc.errno) or exc.strerror or str(exc)
    return OutputError(f"cannot write {final}: {reason}")
