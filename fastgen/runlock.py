"""One process writes a run folder: ``RUN/.lock``, held with ``fcntl.flock`` while a run trains.

The lock belongs to the open file, so the kernel releases it when the process ends, however it ends: a lock is
never stale on the host that took it. The file holds ``pid@host`` of its holder for the message of a refused
second writer; it stays in the folder after release (deleting it would let two processes lock two different
files of one name). The Trainer objects of one process share the folder's lock (it counts them), so a script
may build a trainer again on a folder it trains; another process is refused.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from fastgen.atomic import HOST
from fastgen.errors import UserError

LOCK_FILE = ".lock"

_HELD: dict[str, list] = {}
"""This process's locks: real path of the lock file → [its file descriptor, how many ``RunLock``s hold it]."""


class RunLockedError(UserError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The lock of ``run_dir``; ``acquire`` creates the folder and takes it, ``discard`` removes what it created."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created: list[Path] = []
        """The folders ``acquire`` made (not another process), outermost first; empty when ``run_dir`` existed."""
        self.held = False
        self._key = ""

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``RunLockedError`` naming the folder and the holder (pid, host)."""
        missing, folder = [], self.run_dir
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self.created.append(folder)
            except FileExistsError:  # made by another process meanwhile
                pass
        key = self._key = os.path.realpath(self.path)
        if key not in _HELD:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = self._locked(fd)
                os.close(fd)
                raise error from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{HOST}\n".encode(), 0)
            _HELD[key] = [fd, 0]
        _HELD[key][1] += 1
        self.held = True
        return self

    def check_free(self) -> None:
        """Raise ``RunLockedError`` where another process holds the lock; nothing is created or taken."""
        if not self.path.is_file() or os.path.realpath(self.path) in _HELD:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
        except BlockingIOError:
            raise self._locked(fd) from None
        finally:
            os.close(fd)

    def _locked(self, fd: int) -> RunLockedError:
        """The error naming the holder that the lock file ``fd`` records (pid, host)."""
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        pid, _, host = holder.partition("@")
        who = f"process {pid} on host {host}" if pid and host else "another process"
        return RunLockedError(f"output {self.run_dir} is in use by {who} (lock file {self.path}); wait for that run "
                              "to end, or distil into a new --output")

    def release(self) -> None:
        """Give the lock back (the last ``RunLock`` of this process on the folder unlocks it); idempotent."""
        if not self.held:
            return
        self.held = False
        entry = _HELD[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            os.close(entry[0])  # closing the only descriptor of the open file releases the flock

    def discard(self) -> None:
        """After a failed start: remove ``run_dir`` if this lock created it and holds it (so no other process can
        have written there), and the folders above it that it created while they are empty; then release."""
        if self.held and self.run_dir in self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for folder in reversed(self.created[:-1]):
                try:
                    folder.rmdir()
                except OSError:  # another process's folder is in it
                    break
        self.release()
