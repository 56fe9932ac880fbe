"""The one CSV reading rule, for every CSV the kernel reads (``sample_submission.csv``,
submissions, shard parts, teammates' files).

* **UTF-8, a byte-order mark allowed** (``utf-8-sig``): Excel and Windows tools write one.
  Other bytes are refused with one line naming the file, the byte and its offset
  (``ValueError``).
* **No per-field cap.** The ``csv`` module refuses a field over 131,072 characters by
  default; one PredictionString of a clean row is ~100 KB and a previous submission used as
  the sample (or a teammate's file) easily goes over it. A field can never be longer than
  the file it is in, so the cap protects nothing here: :func:`reader` and
  :func:`dict_reader` lift it (the cap is the process's, so it is lifted, never lowered
  again, and lifting it is idempotent and safe between threads). Importing this module
  lifts it too, so a reader written before this rule existed does not crash either.

Readers: :func:`open_text` + :func:`reader` / :func:`dict_reader`, or :func:`read_rows`
(the header and the rows of a file at once).
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import IO, Iterable, Iterator

__all__ = ["ENCODING", "FIELD_LIMIT", "open_text", "reader", "dict_reader", "read_rows", "not_utf8"]

ENCODING = "utf-8-sig"
#: The largest field read: 2**31 - 1 (a C ``long`` everywhere), i.e. no cap below the file's size.
FIELD_LIMIT = 2**31 - 1


def _lift_field_cap() -> None:
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)


_lift_field_cap()


def not_utf8(path: str | os.PathLike, e: UnicodeDecodeError) -> ValueError:
    """The one-line error for a file that is not UTF-8 text."""
    return ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                      "save it as UTF-8")


@contextlib.contextmanager
def open_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    """``path`` opened for CSV reading (UTF-8, BOM allowed, ``newline=""``); a decoding error
    while it is read becomes :func:`not_utf8`'s ``ValueError``."""
    with open(path, newline="", encoding=ENCODING) as f:
        try:
            yield f
        except UnicodeDecodeError as e:
            raise not_utf8(path, e) from None


def reader(lines: Iterable[str]):
    """``csv.reader(lines)`` under the rule (no field cap)."""
    _lift_field_cap()
    return csv.reader(lines)


def dict_reader(lines: Iterable[str]) -> csv.DictReader:
    """``csv.DictReader(lines)`` under the rule (no field cap)."""
    _lift_field_cap()
    return csv.DictReader(lines)


def read_rows(path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]]]:
    """The header (``None`` for an empty file) and the other rows of the CSV file ``path``.
    ``ValueError`` for text that is not UTF-8, ``OSError`` when it cannot be read."""
    with open_text(Path(path)) as f:
        rows = reader(f)
        header = next(rows, None)
        return header, list(rows)
