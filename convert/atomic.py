"""Write an output atomically: a file (`atomic_output`) or a whole directory (`atomic_directory`).

A crash, Ctrl+C or a full disk leaves the destination untouched (no partial
`.gguf` that llama.cpp would later choke on): the temp file is removed on any
exception and only a complete file is renamed into place with `os.replace`.

A directory (a merged checkpoint, a dequantized GGUF base) is built in a sibling
staging directory, fsynced file by file, and swapped in by `swap_directory`:

    Linux, renameat2(RENAME_EXCHANGE): staging and target trade places in one step;
        the old directory, now under the staging name, is removed.
    elsewhere: target -> .NAME.PID.old, staging -> target, fsync the parent, remove
        the .old. Between the two renames the target is missing; `recover_directory`
        (run by the next `atomic_directory` on the same target) renames the .old back.

So a kill -9 at any point leaves the complete old directory or the complete new one
at the target (after the next call's recovery in the second case), never neither, never
a mix. Leftovers carry their process id: those of a dead process are cleaned up, those
of a live one are left alone.
"""

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alpaca_chat.atomic import atomic_path, fsync_directory
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


# -- directories ------------------------------------------------------------------------------

_STAGING = ".partial"
_BACKUP = ".old"
_ours: set[Path] = set()  # leftovers-to-be of swaps in progress in this process


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; on success it replaces `path` whole.

    On an exception the staging directory is removed and `path` is untouched.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise OutputError(f"cannot write {final}: it is a file, not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=_STAGING))
    _ours.add(staging)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield staging
        swap_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _ours.discard(staging)


def swap_directory(staging: Path, final: Path) -> None:
    """Make the complete directory `staging` the directory `final`, durably (see the module docstring)."""
    _fsync_tree(staging)
    parent = final.parent
    _crash_point("synced")
    if not os.path.lexists(final):
        os.rename(staging, final)
        _crash_point("renamed")
        fsync_directory(parent)
        return
    if _exchange(staging, final):  # `staging` now holds the old directory
        _crash_point("exchanged")
        fsync_directory(parent)
        _crash_point("exchange_synced")
        shutil.rmtree(staging, ignore_errors=True)
        return
    backup = parent / f".{final.name}.{os.getpid()}{_BACKUP}"
    _ours.add(backup)
    try:
        os.rename(final, backup)
        try:
            _crash_point("old_moved_aside")
            os.rename(staging, final)
        except BaseException:
            os.rename(backup, final)
            raise
        try:
            _crash_point("new_in_place")
            fsync_directory(parent)
            _crash_point("parent_synced")
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        _ours.discard(backup)


def recover_directory(final: Path) -> None:
    """Finish what a killed swap of `final` left: put a moved-aside old directory back if `final`
    is missing, and remove the staging and old directories of processes that are gone."""
    final = Path(final)
    prefix = f".{final.name}."
    try:
        leftovers = [p for p in final.parent.iterdir() if p.name.startswith(prefix) and _is_stale(p, prefix)]
    except OSError:
        return
    for leftover in sorted(leftovers, key=lambda p: not p.name.endswith(_BACKUP)):  # backups first
        if leftover.name.endswith(_BACKUP) and not os.path.lexists(final):
            os.rename(leftover, final)  # the swap died between its two renames: the old one comes back
            fsync_directory(final.parent)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _is_stale(path: Path, prefix: str) -> bool:
    if not path.name.endswith((_STAGING, _BACKUP)) or path in _ours:
        return False
    owner = path.name[len(prefix) :].split(".", 1)[0]
    if not owner.isdigit():
        return False  # not one of ours
    pid = int(owner)
    if pid == os.getpid():
        return True  # not in _ours: left by an earlier process that had our id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # a file system or kernel without RENAME_EXCHANGE: the fallback
    raise OSError(code, os.strerror(code), str(b))


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, or another libc without it
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


def _crash_point(name: str) -> None:
    """Where a swap stands; nothing happens here. The crash tests replace it to kill the process."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
