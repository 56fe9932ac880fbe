"""The resume journal: finished rows, one per line, so that a killed run resumes.

Format (JSON lines)::

    {"fingerprint": "<16 hex>"}                                   the run it belongs to
    {"ID": ..., "ImageWidth": w, "ImageHeight": h, "PredictionString": ..., "error": ...}

Each row line is a submission row (:data:`hpa_kernel.formats.submission.COLUMNS`, checked
by the same :func:`~hpa_kernel.formats.submission.check_row` as the CSV writer) plus the
image's error (``null`` when none). The fingerprint (:func:`fingerprint`) covers the data
folder, the IDs, the manifest and the options that change results; a journal with another
fingerprint is ignored. A last line cut by a kill ends the reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from hpa_kernel import __version__
from hpa_kernel.config import KernelConfig
from hpa_kernel.formats.submission import COLUMNS, Row, check_row

logger = logging.getLogger(__name__)

__all__ = ["Journal", "JournalRow", "journal_path", "read_journal", "fingerprint"]

#: ``(width, height, predstring, error)``
JournalRow = tuple[int, int, str, "str | None"]


def journal_path(out: Path) -> Path:
    """Where a run writing ``out`` journals its finished rows."""
    return Path(out).with_name(Path(out).name + ".journal")


def fingerprint(config: KernelConfig, ids: Sequence[str], data_dir: Path, tta: bool) -> str:
    """16 hex digits naming a run: data folder, IDs, manifest, TTA and the package version."""
    h = hashlib.sha256()
    h.update(str(Path(data_dir).resolve()).encode())
    h.update("\n".join(ids).encode())
    h.update(repr(config).encode())
    h.update(repr((tta, __version__)).encode())
    return h.hexdigest()[:16]


def _line(image_id: str, row: Row, error: str | None) -> str:
    width, height, pred = check_row(image_id, row)
    return json.dumps(dict(zip(COLUMNS, (image_id, width, height, pred)), error=error or None)) + "\n"


def read_journal(path: Path, fingerprint: str | None = None) -> dict[str, JournalRow]:
    """The finished rows of a journal, ``{ID: (width, height, predstring, error)}``: empty
    when its header names another ``fingerprint`` (``None``: any). A last line cut by a
    kill ends the reading; everything before it is good."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or (fingerprint is not None and json.loads(lines[0]).get("fingerprint") != fingerprint):
        logger.info("journal %s belongs to another run; starting afresh", path)
        return {}
    rows: dict[str, JournalRow] = {}
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        image_id, width, height, pred = (r[c] for c in COLUMNS)
        rows[image_id] = (*check_row(image_id, (width, height, pred)), r.get("error"))
    return rows


class Journal:
    """Append-only journal of a run (see the module docstring); each row flushed and fsynced."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.rows: dict[str, JournalRow] = {}
        if resume and path.exists():
            try:
                self.rows = read_journal(path, fingerprint)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("journal %s unreadable (%s); starting afresh", path, e)
                self.rows = {}
        if not self.rows:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._fh = open(path, "a")

    def add(self, image_id: str, width: int, height: int, pred: str, error: str | None) -> None:
        line = _line(image_id, (width, height, pred), error)
        self.rows[image_id] = (int(width), int(height), pred, error)
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool) -> None:
        self._fh.close()
        if remove:
            self.path.unlink(missing_ok=True)
