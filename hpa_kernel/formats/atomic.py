"""Atomic file writing, the one way every writer of :mod:`hpa_kernel.formats` replaces a file.

A file is written to a temporary ``.<name>.<random>.tmp`` beside it, flushed, fsynced and
moved over the target with ``os.replace``: the target is either the old file or the
complete new one. The temp file gets the mode ``open()`` would give (``0666 & ~umask``,
not ``mkstemp``'s 0600). A kill between the write and the rename leaves the temp file;
:func:`stale_temps` finds those for the next run to remove.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "atomic_write", "stale_temps", "umask"]

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


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module docstring); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~umask())
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
