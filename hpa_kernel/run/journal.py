"""The resume journal: finished rows, one per line, so that a killed run resumes.

Format (JSON lines)::

    {"fingerprint": "<16 hex>"}                                   the run it belongs to
    {"ID": ..., "ImageWidth": w, "ImageHeight": h, "PredictionString": ..., "error": ...}

Each row line is a submission row (:data:`hpa_kernel.formats.submission.COLUMNS`, checked
by the same :func:`~hpa_kernel.formats.submission.check_row` as the CSV writer) plus the
image's error (``null`` when none). A row with an error is journaled too (the run reports
it), but it is not *done*: a resume does it again (:meth:`Journal.done`). The fingerprint
(:func:`fingerprint`) covers the data folder, the IDs, the manifest and every option that
changes results; a journal with another fingerprint is never resumed from. A last line cut
by a kill ends the reading; any other fault (not UTF-8, not JSON objects, a bad header or
row) makes the journal unreadable: the run warns, naming ``--no-resume``, and starts afresh.

One run per journal: :class:`Journal` holds an exclusive ``fcntl.flock`` on the file from
opening to closing, so a second run on the same ``--out`` refuses at once
(:class:`JournalBusy`) instead of interleaving its rows (``--parallel`` shards write part
files, each with its own journal). The journal is opened without following a symbolic link
and only if it is a regular file (:func:`~hpa_kernel.formats.atomic.open_regular`): a link
or FIFO at ``<out>.journal`` stops the run at start-up, naming it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from hpa_kernel import __version__
from hpa_kernel.config import KernelConfig
from hpa_kernel.formats.atomic import open_regular, read_regular
from hpa_kernel.formats.submission import COLUMNS, Row, check_row

logger = logging.getLogger(__name__)

__all__ = ["Journal", "JournalBusy", "JournalRow", "journal_path", "read_journal", "fingerprint"]

#: ``(width, height, predstring, error)``
JournalRow = tuple[int, int, str, "str | None"]


class JournalBusy(RuntimeError):
    """Another run holds the journal (the same ``--out``); the message says so in one line."""


def journal_path(out: Path) -> Path:
    """Where a run writing ``out`` journals its finished rows."""
    return Path(out).with_name(Path(out).name + ".journal")


def fingerprint(config: KernelConfig, ids: Sequence[str], data_dir: Path, tta: bool, **options: object) -> str:
    """16 hex digits naming a run: data folder, IDs, manifest, TTA, the package version and
    every other option passed in ``options`` that changes results (e.g. ``fp16``,
    ``max_pixels``)."""
    h = hashlib.sha256()
    h.update(str(Path(data_dir).resolve()).encode())
    h.update("\n".join(ids).encode())
    h.update(repr(config).encode())
    h.update(repr((tta, __version__)).encode())
    if options:
        h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()[:16]


def _line(image_id: str, row: Row, error: str | None) -> str:
    width, height, pred = check_row(image_id, row)
    return json.dumps(dict(zip(COLUMNS, (image_id, width, height, pred)), error=error or None)) + "\n"


def _parse(text: str, fingerprint: str | None, where: Path) -> dict[str, JournalRow] | None:
    """The rows of a journal's text; ``None`` when it belongs to another run. ``ValueError``
    naming the fault when it is not a journal."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or not isinstance(head.get("fingerprint"), str) or not head["fingerprint"]:
        raise ValueError("its first line is not a fingerprint header")
    if fingerprint is not None and head["fingerprint"] != fingerprint:
        return None
    rows: dict[str, JournalRow] = {}
    for k, line in enumerate(lines[1:], start=2):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines):  # the last line, cut by a kill
                break
            raise ValueError(f"line {k} is not JSON") from None
        if not isinstance(r, dict) or any(c not in r for c in COLUMNS):
            raise ValueError(f"line {k} is not a row")
        error = r.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"line {k}: error is not text")
        image_id, width, height, pred = (r[c] for c in COLUMNS)
        if not isinstance(image_id, str):
            raise ValueError(f"line {k}: ID is not text")
        rows[image_id] = (*check_row(image_id, (width, height, pred)), error)
    return rows


def read_journal(path: Path, fingerprint: str | None = None) -> dict[str, JournalRow]:
    """The rows of a journal, ``{ID: (width, height, predstring, error)}`` (failed rows
    included): empty when its header names another ``fingerprint`` (``None``: any). A last
    line cut by a kill ends the reading; everything before it is good. Raises ``ValueError``
    (or ``OSError``) for a file that is not a journal."""
    data = read_regular(path)
    rows = _parse(data.decode("utf-8"), fingerprint, Path(path))
    if rows is None:
        logger.info("journal %s belongs to another run; starting afresh", path)
        return {}
    return rows


class Journal:
    """Append-only journal of a run (see the module docstring); each row flushed and
    fsynced; the file locked (``flock``) while open.

    ``rows`` holds every journaled row, failed ones included; :meth:`done` says which need
    no work. Raises :class:`JournalBusy` when another process holds the journal.
    """

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.rows: dict[str, JournalRow] = {}
        #: why an existing journal was not resumed from (one line), else ``None``
        self.warning: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._open_locked()
        try:
            self._start(resume)
        except BaseException:
            self._fh.close()
            raise

    def _open_locked(self):
        while True:
            fh = os.fdopen(open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND), "a+b")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise JournalBusy(
                    f"journal {self.path} is locked by another run on the same --out; "
                    "wait for it to finish or choose another --out"
                ) from None
            except BaseException:
                fh.close()
                raise
            try:  # the holder may have finished and removed the file meanwhile: lock the current one
                same = os.lstat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fh
            fh.close()

    def _start(self, resume: bool) -> None:
        fh = self._fh
        fh.seek(0)
        data = fh.read()
        if resume and data:
            try:
                rows = _parse(data.decode("utf-8"), self.fingerprint, self.path)
            except ValueError as e:  # UnicodeDecodeError included
                self.warning = (f"journal {self.path} is unreadable ({' '.join(str(e).split())[:200]}); "
                                "started afresh (--no-resume skips reading it)")
                rows = {}
            if rows is None:
                self.warning = (f"journal {self.path} belongs to a run with other data or options; "
                                "started afresh (--no-resume skips reading it)")
                rows = {}
            if self.warning:
                logger.warning("%s", self.warning)
            self.rows = rows
        if not self.rows:
            fh.truncate(0)
            fh.write((json.dumps({"fingerprint": self.fingerprint}) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    def done(self, image_id: str) -> bool:
        """Whether ``image_id`` has a journaled row without an error (a resume skips it)."""
        row = self.rows.get(image_id)
        return row is not None and not row[3]

    def add(self, image_id: str, width: int, height: int, pred: str, error: str | None) -> None:
        line = _line(image_id, (width, height, pred), error)
        self.rows[image_id] = (int(width), int(height), pred, error)
        self._fh.write(line.encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool) -> None:
        """Release the lock; ``remove``: delete the journal first (while still holding it)."""
        if self._fh.closed:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            self._fh.close()
