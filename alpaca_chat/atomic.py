"""The one way a file is written: to a temp file beside it, fsynced, renamed into place, directory fsynced.

A crash, a kill -9, Ctrl+C or a full disk leaves either the old file or the new one, never a
mix, and a power cut after the rename does not bring back the old one. Every writer (exports,
the converter's outputs through `convert.atomic`) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically and durably; return the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
