"""Atomic file writing, the one way every writer of :mod:`hpa_kernel.formats` replaces a file.

A file is written to a temporary ``.<name>.<random>.tmp`` beside it, flushed, fsynced and
moved over the target with ``os.replace``: the target is either the old file or the
complete new one. The temp file gets the mode ``open()`` would give (``0666 & ~umask``,
not ``mkstemp``'s 0600). A kill between the write and the rename leaves the temp file;
:func:`stale_temps` finds those for the next run to remove.

Files a run keeps open or reads back (the journal, the ``--out`` lock, the per-cell
export's files) are opened with :func:`open_regular` / :func:`read_regular`: a symbolic
link is never followed (``O_NOFOLLOW``) and only a regular file is used -- a FIFO, device
or folder is refused at once, without blocking (``O_NONBLOCK``, then ``fstat``).
:func:`check_folder` says whether a folder can be written (or created), before any work.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "atomic_write", "stale_temps", "umask", "open_regular", "read_regular", "check_folder",
           "check_real_folder"]

TEMP_SUFFIX = ".tmp"


def umask() -> int:
    """This process's umask (read without a window where it is changed, where /proc has it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes, keep_mode: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module docstring); returns ``path``.
    ``keep_mode``: the new file gets the mode of the one it replaces (when there is one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~umask()
    if keep_mode:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stale_temps(path: str | os.PathLike) -> list[Path]:
    """The temp files :func:`atomic_write` leaves beside ``path`` when killed mid-write:
    ``.<name>.<random>.tmp`` (``mkstemp``'s letters, digits and ``_``), regular files only."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX))
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink()]


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags)`` for a regular file only: a symbolic link at ``path`` is not
    followed and a FIFO, device or folder is refused without blocking. Returns the file
    descriptor (blocking, close-on-exec); ``OSError`` with a one-line reason naming ``path``."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link (not followed); remove it") from None
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO without a reader, a folder
            raise OSError(f"{path} is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`: no symbolic link, no FIFO)."""
    with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
        return f.read()


def check_real_folder(folder: str | os.PathLike) -> Path:
    """``folder`` if it is a folder and not a symbolic link (created when missing);
    ``OSError`` naming it otherwise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{folder} is a symbolic link (not followed); remove it")
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{folder} is not a folder")
    return folder


def check_folder(folder: str | os.PathLike) -> None:
    """Check, before any work, that files can be written in ``folder`` (created later when
    missing): ``OSError`` with a one-line reason when it, or the nearest part of its path
    that exists, is not a folder, or that cannot be written. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    near = folder
    while not near.exists() and near != near.parent:  # the nearest folder that exists
        near = near.parent
    if not near.is_dir():
        raise NotADirectoryError(f"{folder}: {near} is not a folder")
    if not os.access(near, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder}: cannot write in {near}")
