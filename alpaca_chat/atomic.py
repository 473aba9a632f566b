"""The one way a file is written: to a temp file beside it, fsynced, renamed into place, directory fsynced.

A crash, a kill -9, Ctrl+C or a full disk leaves either the old file or the new one, never a
mix, and a power cut after the rename does not bring back the old one. Every writer (exports,
saved KV states, the converter's outputs through `convert.atomic`) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alpaca_chat.errors import AlpacaChatError

Buffer = bytes | bytearray | memoryview  # collections.abc.Buffer from Python 3.12 on


class WriteError(AlpacaChatError, OSError):
    """`write_atomic` could not write a file: str() is one line naming it and why.

    Also an OSError, with the errno and strerror of the failure, for callers that catch those.
    """

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        super().__init__(errno, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it becomes `path` durably, else it is removed.

    `mode` None gives the file the usual permissions (0666 less the umask); OSError propagates.
    """
    final = Path(path)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        replace_durably(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_durably(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory (so the rename itself survives)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_directory(Path(final).parent)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str], data: bytes | str | Sequence[Buffer], *, mode: int | None = None
) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically and durably; return the path.

    `data` may be a sequence of bytes-like parts (e.g. a header and a memoryview of a large
    payload): they are written one after the other, never joined into one copy in memory.
    A leading ~ in `path` is the user's home. `mode` None gives the usual permissions (0666
    less the umask). Raises WriteError (an OSError) when the file cannot be written: the old
    file, or none, stays.
    """
    if isinstance(data, str):
        parts: Sequence[Buffer] = [data.encode("utf-8")]
    elif isinstance(data, (bytes, bytearray, memoryview)):
        parts = [data]
    else:
        parts = data
    target = Path(path).expanduser()
    try:
        with atomic_path(target, mode=mode) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                for part in parts:
                    _write_all(fd, part)
            finally:
                os.close(fd)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WriteError(f"cannot write {target.absolute()}: {reason}", exc.errno, exc.strerror) from exc
    return target


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
