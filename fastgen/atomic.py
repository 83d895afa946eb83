"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything is written under a temporary name beside the destination, ``.<name>.tmp-<pid>-<host>-<tag>``,
flushed to disk (``fsync``), then renamed into place with ``os.replace``, which is atomic within one file
system. A failed write removes its temporary; a killed one leaves it, and the next write into the same folder
removes it once its owner is gone (:func:`remove_stale_temps`). A full disk, a quota or a file too large for
its file system raises :class:`fastgen.errors.NoSpaceError`: one line naming the path, the bytes needed when
known, and what is intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

from fastgen.errors import NoSpaceError, UserError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
"""OS errors that mean "no room for this write"."""
STALE_AFTER_S = 24 * 3600
"""A temporary of another host (whose processes cannot be seen) is stale when nothing in it changed for this long."""
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
_TEMP = re.compile(r"\..+\.tmp-(?P<pid>\d+)-(?P<host>.+)-[0-9a-f]{8}")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an OS error


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (folders only where the OS allows it)."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder``, and ``folder`` itself, to disk."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fsync(path)


def temp_sibling(path: Path) -> Path:
    """A fresh temporary name beside ``path``, owned by this process (its PID and host are in the name)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}")


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporaries in ``folder`` that killed writes left: those of a process of this host that no
    longer runs, and those of another host unchanged for ``STALE_AFTER_S``. A live writer's are kept."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _TEMP.fullmatch(path.name)
        if match and _owner_gone(int(match["pid"]), match["host"], path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _owner_gone(pid: int, host: str, path: Path) -> bool:
    if host != HOST:
        try:
            newest = max([path.lstat().st_mtime] + [p.lstat().st_mtime for p in path.rglob("*")])
        except OSError:  # removed meanwhile
            return False
        return time.time() - newest > STALE_AFTER_S
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or a PID beyond what this system has)
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def no_space_errno(err: BaseException) -> int | None:
    """The errno of ``err`` when it means "no room for this write" (``NO_SPACE_ERRNOS``), else None; also for
    safetensors' ``SafetensorError``, which carries the OS error in its message."""
    if isinstance(err, UserError):
        return None
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = _OS_ERROR.search(str(err))
        code = int(found.group(1)) if found else None
    return code if code in NO_SPACE_ERRNOS else None


@contextlib.contextmanager
def reporting_no_space(target: Path, needed: int | None = None, intact: str | None = None,
                       retry: str = "run the command again") -> Iterator[None]:
    """Within: an error that means "no room" (``no_space_errno``) while writing ``target`` becomes a
    ``NoSpaceError`` naming ``target``, ``needed`` bytes (when given) and the free bytes, and saying ``intact``
    (by default: the previous ``target`` is intact, or nothing was written) and, after the remedy, ``retry``."""
    if intact is None:
        intact = f"the previous {target} is intact" if target.exists() else f"nothing was written to {target}"
    try:
        yield
    except Exception as err:
        code = no_space_errno(err)
        if code is None:
            raise
        room = f"; it needs about {needed:,} bytes, {_free_bytes(target):,} are free there" if needed else ""
        remedy = ("files there are limited in size (by the file system or `ulimit -f`): write elsewhere"
                  if code == errno.EFBIG else "free space (or write elsewhere)")
        error = NoSpaceError(f"cannot write {target}: {os.strerror(code)}{room}; {intact} and the partial write was "
                             f"removed: {remedy} and {retry}")
        error.errno = code
        raise error from err


def _free_bytes(path: Path) -> int:
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None, intact: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is flushed and renamed to
    ``path``, on error removed (and ``path`` left as it was). ``needed`` and ``intact`` go to
    :func:`reporting_no_space`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_sibling(path)
    try:
        with reporting_no_space(path, needed, intact):
            tmp.touch(exist_ok=False)
            yield tmp
            fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, needed: int | None = None, intact: str | None = None,
                  retry: str = "run the command again") -> Iterator[Path]:
    """Yield a new temporary folder beside ``path`` to fill; on success every file in it is flushed and it
    replaces ``path`` (an existing ``path`` is moved aside first and deleted after), on error it is removed and
    ``path`` left as it was. ``needed``, ``intact`` and ``retry`` go to :func:`reporting_no_space`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp, old = temp_sibling(path), None
    try:
        with reporting_no_space(path, needed, intact, retry):
            tmp.mkdir()
            yield tmp
            fsync_tree(tmp)
            if path.exists():
                old = temp_sibling(path)
                os.replace(path, old)
            os.replace(tmp, path)
            fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)
