"""One run per ``--out``: the lock file ``<out>.lock``.

A run (a plain run, and the parent of a ``--parallel`` run, whose shards each hold the
lock of their own part file) holds ``<out>.lock`` from start-up to the end:
:func:`hold_output` takes an exclusive ``fcntl.flock`` on it and writes its pid into it;
a second run on the same ``--out`` is refused at once (:class:`OutputBusy`, one line
naming the holder's pid). At the end the file is removed. A lock file left by a process
that died (killed: the kernel released its ``flock``, the file stays) is taken over
with a warning naming the dead pid. Taking the lock again in the same process (the CLI,
then :func:`hpa_kernel.run.pipeline.run`) nests. The file is opened without following a
symbolic link and only if it is a regular file
(:func:`~hpa_kernel.formats.atomic.open_regular`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

from hpa_kernel.formats.atomic import open_regular

logger = logging.getLogger(__name__)

__all__ = ["OutputBusy", "lock_path", "hold_output"]

#: locks this process holds: lock path -> [fd, depth, take-over warning]
_HELD: dict[str, list] = {}


class OutputBusy(RuntimeError):
    """Another live run holds the lock of the same ``--out``; the message says so in one line."""


def lock_path(out: Path) -> Path:
    """The lock file of a run writing ``out``."""
    return Path(out).with_name(Path(out).name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _acquire(path: Path, out: Path) -> tuple[int, str | None]:
    """Lock ``path``: ``(fd, warning)``, the warning when a dead run's lock was taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputBusy(f"{out} is in use by another run (pid {pid if pid else '?'} holds {path}); "
                             "wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder may have finished and removed the file meanwhile: lock the current one
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        old = _read_pid(fd)
        warning = None
        if old is not None and old != os.getpid():
            state = "which is no longer running" if not _alive(old) else "which no longer holds it"
            warning = f"took over the lock {path} left by pid {old}, {state}"
            logger.warning("%s", warning)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, warning


@contextlib.contextmanager
def hold_output(out: str | os.PathLike) -> Iterator[str | None]:
    """Hold the lock of ``out`` for the ``with`` block; yields the take-over warning (a
    stale lock of a dead run; a nested hold yields the outer one's) or ``None``. Raises :class:`OutputBusy` when another run
    holds it, ``OSError`` when the lock file cannot be made (e.g. a symbolic link there)."""
    path = lock_path(Path(out))
    key = os.path.abspath(path)  # not resolve(): a link there is refused, never followed
    if key in _HELD:  # this process holds it already: nest (the same warning, for the report)
        _HELD[key][1] += 1
        try:
            yield _HELD[key][2]
        finally:
            _HELD[key][1] -= 1
        return
    fd, warning = _acquire(path, Path(out))
    _HELD[key] = [fd, 1, warning]
    try:
        yield warning
    finally:
        del _HELD[key]
        try:
            path.unlink(missing_ok=True)  # while still holding it
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)
        os.close(fd)
