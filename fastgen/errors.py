"""Errors caused by the user's input, which the ``fastgen`` command reports as one line without a traceback.

Every error that a path, a file, a config value, a flag or the environment (a missing optional package, no
GPU for fp16) causes derives from :class:`UserError`; its message names the field or path, the value and
what was expected. The command line prints ``error: <message>`` and exits with :attr:`UserError.exit_code`
(2 for usage errors, as argparse does, 1 otherwise). Anything else is a bug and keeps its traceback.

The subclasses also derive from the built-in type a caller would catch (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` around fastgen's API keeps working.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class UserError(Exception):
    """An error in the user's input or environment; the message says what is wrong and what was expected."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """A flag or config value is invalid (exit status 2, as argparse uses for bad arguments)."""

    exit_code = 2


class InputError(UserError, ValueError):
    """A file or folder the user gave has the wrong content (not a pipeline, incomplete, wrong size...)."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist."""


class EnvironmentMissingError(UserError, ValueError):
    """The environment lacks what an option needs (an optional package, a GPU); a ``ValueError`` as the option's
    value is what cannot be used."""


class NoSpaceError(UserError, OSError):
    """A write failed for lack of room (disk full, quota, file too large for its file system); the message names
    the path, the bytes needed when known, and what was left intact (``fastgen.atomic``)."""


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr: one line about something fastgen worked around (a damaged cache
    rebuilt, a damaged checkpoint skipped); once per run, by its first process (``RANK`` 0 or unset)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def check_fields(rules, prefix: str = "") -> None:
    """Raise one ``UsageError`` naming every broken rule: ``rules`` holds ``(ok, key, value, expected)``; the message
    reads ``<prefix><key> is <value>; expected <expected>`` per broken rule. Config dataclasses call it from
    ``__post_init__``, so a bad value fails when the config is built (loaded), before anything else runs."""
    bad = [f"{prefix}{key} is {value!r}; expected {expected}" for ok, key, value, expected in rules if not ok]
    if bad:
        raise UsageError("; ".join(bad))


USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
"""What the command line reports as the user's error: fastgen's own, and the file-system errors of paths
the user named (the message of a bare ``OSError`` is completed with :func:`describe`)."""


def describe(err: BaseException) -> str:
    """The one-line message of a user error; a bare ``OSError`` gets its path and cause spelled out."""
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.filename is not None \
            and str(err).startswith("[Errno"):
        reason = (err.strerror or "").lower() or type(err).__name__
        return f"cannot use {err.filename}: {reason}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def check_output_path(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that ``path`` (a file or folder to write, named by ``flag``) can be created:
    its names and its length within the file system's limits, its nearest existing ancestor a writable folder."""
    path = Path(path).expanduser()
    # the files written under an output folder add about PATH_MARGIN bytes (checkpoints/step-N/...)
    path_max = _limit(Path(path.anchor or "."), "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(path.absolute()))) > path_max - PATH_MARGIN:
        raise InputError(f"{flag}: the path {str(path)[:40]}... is {len(os.fsencode(str(path.absolute())))} bytes "
                         f"long; expected at most {path_max - PATH_MARGIN} (this file system's {path_max} less room "
                         "for the files written under it)")
    name_max = _limit(Path(path.anchor or "."), "PC_NAME_MAX", 255)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise InputError(f"{flag}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; expected at "
                             f"most {name_max}, this file system's limit")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a folder; expected a path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_mount(ancestor):
        raise InputError(f"{flag} {path}: folder {ancestor} is not writable; expected a path you can write to")
    return path


PATH_MARGIN = 256
"""Room left under an output path for the names fastgen writes below it."""


def _limit(folder: Path, name: str, default: int) -> int:
    """A file-system limit of ``folder`` (``os.pathconf``), ``default`` where the platform does not say."""
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default


def _read_only_mount(folder: Path) -> bool:
    """Whether ``folder`` lies on a read-only file system (``os.access`` says yes to root regardless)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
