"""``submission.csv``: the one reader (:func:`read_submission`, :func:`parse_prediction_string`),
the atomic writer and the validator (joining shard parts: :mod:`hpa_kernel.run.join`).

The metric and the shard join read files with :func:`read_submission` (strict), the team merge
with :func:`read_submission_rows` (the same reader, lenient: a malformed row costs only its
ID); the validator reads the same CSV lines leniently, to report every fault, with the same
triple grammar (:func:`triple_faults`); the resume journal stores its rows as :data:`Row`.
Every CSV is read under the one rule of :mod:`hpa_kernel.formats.csvfile`.

A row is ``ID,ImageWidth,ImageHeight,PredictionString``; PredictionString is space-separated
triples ``class confidence mask`` (one per cell and class, the cell's mask string repeated
for each of its classes), empty for an image without predictions.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import io
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.atomic import atomic_write, check_folder, stale_temps
from hpa_kernel.formats.csvfile import read_rows
from hpa_kernel.formats.images import DEFAULT_MAX_PIXELS, read_sample
from hpa_kernel.formats.rle import check_masks

__all__ = [
    "COLUMNS",
    "CONFIDENCE_FORMAT",
    "format_confidence",
    "prediction_string",
    "write_submission",
    "prepare_output",
    "validate_submission",
    "sample_size_problems",
    "read_submission",
    "read_submission_rows",
    "parse_prediction_string",
    "triple_faults",
    "check_row",
    "Row",
]

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
#: Confidences are written with 6 significant digits: short, deterministic, and precise
#: enough that ranking (all the metric uses) is kept to within 1e-6 relative.
CONFIDENCE_FORMAT = ".6g"

Row = tuple[int, int, str]


def format_confidence(value: float) -> str:
    """A confidence as written in a PredictionString (``format(value, '.6g')``)."""
    return format(float(value), CONFIDENCE_FORMAT)


def prediction_string(
    rles: Mapping[int, str],
    cell_ids: Sequence[int] | np.ndarray,
    scores: np.ndarray,
) -> str:
    """Build one image's PredictionString.

    Parameters
    ----------
    rles:
        ``{cell_id: mask string}``, e.g. from :func:`hpa_kernel.formats.rle.encode_label_image`;
        each cell's string is reused for all its classes. A cell without an entry (its mask
        is empty at the original size) is skipped.
    cell_ids:
        ``(n,)`` cell labels; row i of ``scores`` belongs to ``cell_ids[i]``.
    scores:
        ``(n, 19)`` per-cell class confidences: a (cell, class) is written when its score is
        ``> 0`` (the ``min_confidence`` floor was applied by the class-selection rule,
        :func:`hpa_kernel.stages.ensemble.select_top_classes`). Non-finite scores are
        skipped with a warning.

    Returns
    -------
    Triples ``class confidence mask`` joined by spaces, cells in the given order and classes
    ascending within a cell; ``""`` when nothing is kept.
    """
    ids = np.asarray(cell_ids).reshape(-1)
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape != (ids.size, NUM_CLASSES):
        raise ValueError(f"scores must have shape ({ids.size}, {NUM_CLASSES}), got {scores.shape}")
    finite = np.isfinite(scores)
    if not finite.all():
        logger.warning("%d non-finite score(s) skipped", int((~finite).sum()))
    keep = finite & (scores > 0)
    rows, classes = np.nonzero(keep)
    if rows.size == 0:
        return ""
    missing = sorted({int(ids[r]) for r in np.unique(rows)} - set(int(k) for k in rles))
    if missing:
        logger.debug("cells without a mask string skipped: %s", missing[:10])
    values = scores[rows, classes].tolist()
    parts = [
        f"{c} {format_confidence(v)} {rles[cid]}"
        for cid, c, v in zip(ids[rows].tolist(), classes.tolist(), values)
        if cid in rles
    ]
    return " ".join(parts)


def triple_faults(cls: str, conf: str) -> list[tuple[str, str]]:
    """What is wrong with one triple's class and confidence tokens, as ``(fault, detail)``
    pairs; empty when the class is an integer in 0..18 and the confidence a finite number.
    The one triple grammar: :func:`parse_prediction_string` and the validator use it."""
    faults = []
    try:
        c = int(cls)
    except ValueError:
        c = -1
    if not 0 <= c < NUM_CLASSES:
        faults.append((f"class not in 0..{NUM_CLASSES - 1}", f" ({cls!r})"))
    try:
        ok = math.isfinite(float(conf))
    except ValueError:
        ok = False
    if not ok:
        faults.append(("confidence not a finite number", f" ({conf!r})"))
    return faults


def parse_prediction_string(text: str) -> list[tuple[int, float, str]]:
    """Split a PredictionString into ``(class_id, confidence, mask_string)`` triples.

    Empty or blank -> ``[]``. Raises ``ValueError`` when the token count is not a multiple
    of 3, a class is not an integer in 0..18, or a confidence is not a finite number
    (:func:`triple_faults`). Mask strings are not decoded here (:mod:`hpa_kernel.formats.rle`).
    """
    tokens = str(text).split()
    if len(tokens) % 3:
        raise ValueError(f"{len(tokens)} tokens is not a whole number of 'class confidence mask' triples")
    out = []
    for k in range(0, len(tokens), 3):
        c, conf, mask = tokens[k : k + 3]
        faults = triple_faults(c, conf)
        if faults:
            raise ValueError(f"triple {k // 3}: {faults[0][0]}{faults[0][1]}")
        out.append((int(c), float(conf), mask))
    return out


def check_row(image_id: str, row: Row) -> Row:
    """``row`` as ``(int width, int height, str predstring)``, or ``ValueError`` naming the fault
    (not integers, a comma/quote/newline in the string, predictions without a positive size)."""
    try:
        width, height, text = row
    except (TypeError, ValueError):
        raise ValueError(f"row for {image_id!r} must be (width, height, predstring), got {row!r}") from None
    if isinstance(width, bool) or isinstance(height, bool) or int(width) != width or int(height) != height:
        raise ValueError(f"row for {image_id!r}: width/height must be integers, got {width!r}, {height!r}")
    text = "" if text is None else str(text)
    if any(ch in text for ch in ',"\r\n'):
        raise ValueError(f"row for {image_id!r}: PredictionString contains a comma, quote or newline")
    if text and (width <= 0 or height <= 0):
        raise ValueError(f"row for {image_id!r}: predictions need a positive size, got {width}x{height}")
    if width <= 0 or height <= 0:
        logger.warning("row for %s has no positive size (%sx%s)", image_id, width, height)
    return int(width), int(height), text


def prepare_output(path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Check, before any work, that :func:`write_submission` can write ``path``, and remove
    the temp files a killed earlier write left beside it (:func:`~hpa_kernel.formats.atomic.stale_temps`; nothing else).

    Raises ``OSError`` with a one-line reason when ``path`` is a folder or another
    non-regular file, when it is one of ``inputs`` (the sample, a file being merged: it
    would be overwritten), or when its folder is not a folder or cannot be created or
    written. Creates nothing. Every command that writes a submission calls it first.
    """
    path = Path(path)
    for other in inputs:
        if path.exists() and Path(other).exists() and os.path.samefile(path, other):
            raise FileExistsError(f"{path} is {other}, an input of this command; name another file to write")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name the file to write")
    if path.exists() and not path.is_file():
        raise OSError(f"{path} exists and is not a regular file")
    check_folder(path.parent)
    for stale in stale_temps(path):
        try:
            stale.unlink()
            logger.info("removed %s, left by an interrupted write", stale)
        except OSError as e:
            logger.warning("could not remove %s (left by an interrupted write): %s", stale, e)


def write_submission(
    rows: Mapping[str, Row],
    sample_ids: Sequence[str],
    path: str | os.PathLike,
    fallback: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Write ``submission.csv`` atomically: every sample ID once, in the sample's order.

    ``rows`` maps ID -> ``(width, height, predstring)``. An ID of ``sample_ids`` without a
    row is an error (``KeyError`` listing them) unless ``fallback`` gives its size -- one
    ``(width, height)`` for all, or ``{ID: (width, height)}`` such as
    ``hpa_kernel.formats.images.read_sample(path).sizes`` is -- in which case it is written with an
    empty PredictionString and a warning. Rows for IDs not in the sample are not written
    (warning); a duplicate sample ID is written once.

    The file is written to a temporary file in the same folder, flushed, fsynced, and moved
    over ``path`` with ``os.replace``, so ``path`` is either the old file or the complete
    new one. Returns ``path``.
    """
    path = Path(path)
    order = list(dict.fromkeys(sample_ids))
    if len(order) != len(sample_ids):
        logger.warning("sample_ids has %d duplicate(s); each ID written once", len(sample_ids) - len(order))
    missing = [i for i in order if i not in rows]
    if missing:
        if fallback is None:
            raise KeyError(f"no row for {len(missing)} sample ID(s): {missing[:5]}")
        logger.warning("%d sample ID(s) without a row written empty: %s", len(missing), missing[:5])
    extra = set(rows) - set(order)
    if extra:
        logger.warning("%d row(s) not in the sample were not written: %s", len(extra), sorted(extra)[:5])

    def row_for(image_id: str) -> Row:
        if image_id in rows:
            return check_row(image_id, rows[image_id])
        if isinstance(fallback, Mapping):
            if image_id not in fallback:
                raise KeyError(f"no row and no fallback size for sample ID {image_id!r}")
            w, h = fallback[image_id]
        else:
            w, h = fallback  # type: ignore[misc]
        return check_row(image_id, (w, h, ""))

    lines = [(image_id, *row_for(image_id)) for image_id in order]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(lines)
    atomic_write(path, buf.getvalue().encode())
    logger.info("wrote %s (%d rows)", path, len(lines))
    return path


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int | None:
    try:
        v = int(text)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def _read_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """Header (names stripped of blanks) and rows, under the one CSV rule (:mod:`~hpa_kernel.formats.csvfile`)."""
    header, rows = read_rows(path)
    return (None if header is None else [h.strip() for h in header]), rows


def _summarise(image_id: str, what: str, where: list[tuple[int, str]]) -> str:
    """One line for all triples of a row with the same fault: the first one and a count."""
    t, detail = min(where)
    more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
    return f"ID {image_id}: {what}: triple {t + 1}{detail}{more}"


def sample_size_problems(sizes: Mapping[str, tuple[int, int]], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """One line per sample ID whose ``ImageWidth x ImageHeight`` is over ``max_pixels`` (the
    image reader's cap, ``--max-pixels``): such a sample is refused, since its sizes bound
    what the validator inflates and what the merge allocates."""
    return [f"ID {image_id!a}: {w}x{h} is over the {max_pixels}-pixel cap"
            for image_id, (w, h) in sizes.items() if w * h > max_pixels]


def _mask_size(row: tuple[int | None, int | None], said: tuple[int, int], max_pixels: int) -> tuple[tuple[int, int] | None, str]:
    """The ``(height, width)`` a row's masks are checked at -- the sample's size where it gives
    one, never the row's own claim beyond it -- or ``None`` and why not."""
    w, h = row
    if w is None or h is None:
        return None, "masks not checked (no valid size)"
    if min(said) > 0 and (w, h) != said:
        return None, "masks not checked (size differs from the sample's)"
    if w * h > max_pixels:
        return None, f"masks not checked ({w}x{h} is over the {max_pixels}-pixel cap)"
    return (h, w), ""


def _validation_sample(sample_path: Path, max_pixels: int) -> tuple[dict[str, tuple[int, int]], str]:
    """The sample's sizes, or the one line saying why it cannot be validated against."""
    try:
        sample = read_sample(sample_path).sizes
    except (OSError, ValueError, csv.Error) as e:
        return {}, f"sample {sample_path}: cannot read ({' '.join(str(e).split())})"
    if not sample:
        return {}, f"sample {sample_path}: has no IDs"
    absurd = sample_size_problems(sample, max_pixels)
    if absurd:
        more = f" (and {len(absurd) - 1} more)" if len(absurd) > 1 else ""
        return {}, f"sample {sample_path}: refused, {absurd[0]}{more}"
    return sample, ""


def _id_problems(rows: list[list[str]], sample: Mapping[str, tuple[int, int]]) -> list[str]:
    """IDs repeated, not in the sample, or missing."""
    problems: list[str] = []
    counts = Counter(r[0].strip() if r else "" for r in rows)
    for image_id, n in counts.items():
        if n > 1:
            problems.append(f"ID {image_id}: appears {n} times")
        if image_id not in sample:
            problems.append(f"ID {image_id}: not in the sample" if image_id else "a row has an empty ID")
    for image_id in sample:
        if image_id not in counts:
            problems.append(f"ID {image_id}: missing")
    return problems


def validate_submission(path: str | os.PathLike, sample_path: str | os.PathLike,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """Check a submission against the sample; return one-line problems (empty = valid).

    Checks: the header is exactly ``ID,ImageWidth,ImageHeight,PredictionString``; every
    sample ID appears exactly once and no other ID appears; widths/heights are positive
    integers equal to the sample's where the sample gives them (non-zero); the
    PredictionString is whitespace-separated triples with a class in 0..18, a finite
    confidence, and a mask string that decodes at the row's size to a non-empty mask.
    Faults of one kind in one row are reported once, with the first offending triple and a
    count. Mask strings are checked in one vectorised pass without decoding them to pixels
    (:func:`hpa_kernel.formats.rle.check_masks`), each distinct (mask, size) once.

    What is inflated is bounded by the sample, never by the row: masks are checked at the
    sample's size (a row claiming another size is reported and its masks are not checked; a
    row of an ID the sample gives no size for is checked at its own size up to
    ``max_pixels``), and a sample declaring a size over ``max_pixels``
    (:func:`sample_size_problems`) is refused.
    """
    path, sample_path = Path(path), Path(sample_path)
    sample, refusal = _validation_sample(sample_path, max_pixels)
    if refusal:
        return [refusal]
    try:
        header, rows = _read_rows(path)
    except (OSError, ValueError, csv.Error) as e:
        return [f"{path}: cannot read ({' '.join(str(e).split())})"]
    if header is None:
        return [f"{path}: empty file"]
    if header != list(COLUMNS):
        return [f"{path}: columns {header} differ from {list(COLUMNS)}"]

    problems = _id_problems(rows, sample)
    # (row problems list, image id, triple index) per distinct mask and size
    mask_refs: dict[tuple[str, int, int], list[tuple[str, int]]] = {}
    row_faults: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for line_no, r in enumerate(rows, start=2):
        image_id = r[0].strip() if r else ""
        label = image_id or f"(line {line_no})"
        if len(r) != len(COLUMNS):
            problems.append(f"ID {label}: line {line_no} has {len(r)} fields, expected {len(COLUMNS)}")
            continue
        faults = row_faults.setdefault(label, {})
        w, h = _positive_int(r[1]), _positive_int(r[2])
        for name, value, text, ref in (
            ("ImageWidth", w, r[1], sample.get(image_id, (0, 0))[0]),
            ("ImageHeight", h, r[2], sample.get(image_id, (0, 0))[1]),
        ):
            if value is None:
                problems.append(f"ID {label}: {name} {text!r} is not a positive integer")
            elif ref and value != ref:
                problems.append(f"ID {label}: {name} {value} differs from the sample's {ref}")
        tokens = r[3].split()
        if len(tokens) % 3:
            problems.append(f"ID {label}: PredictionString has {len(tokens)} tokens, not a multiple of 3")
            continue
        size, unchecked = _mask_size((w, h), sample.get(image_id, (0, 0)), max_pixels)
        for t in range(len(tokens) // 3):
            cls, conf, mask = tokens[3 * t : 3 * t + 3]
            for what, detail in triple_faults(cls, conf):
                faults.setdefault(what, []).append((t, detail))
            if size is None:
                faults.setdefault(unchecked, []).append((t, ""))
            else:
                mask_refs.setdefault((mask, *size), []).append((label, t))

    keys = list(mask_refs)
    areas, errors = check_masks([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])
    for key, area, error in zip(keys, areas.tolist(), errors):
        if error is None and area > 0:
            continue
        what, detail = ("bad mask", f" ({error})") if error else ("empty mask", "")
        for label, t in mask_refs[key]:
            row_faults[label].setdefault(what, []).append((t, detail))

    for label, faults in row_faults.items():
        for what, where in faults.items():
            problems.append(_summarise(label, what, where))
    return problems


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def read_submission_rows(path: str | os.PathLike) -> tuple[dict[str, Row], dict[str, str]]:
    """The rows of a submission CSV, leniently: ``({ID: (width, height, predstring)},
    {ID: fault})``. A row that cannot be taken (another number of fields, a width or height
    that is not an integer, an ID on more than one row) is left out of the rows and its ID
    (``(line N)`` without one) gets the fault, one line naming the line number(s). IDs are
    stripped of blanks. ``ValueError`` for another header or text that is not UTF-8 (the
    file as a whole cannot be read), ``OSError`` when it cannot be opened.
    """
    header, body = _read_rows(Path(path))
    if header is None or header != list(COLUMNS):
        raise ValueError(f"{path}: not a submission (columns {header})")
    rows: dict[str, Row] = {}
    faults: dict[str, str] = {}
    lines: dict[str, list[int]] = {}
    for n, r in enumerate(body, 2):
        image_id = r[0].strip() if r else ""
        key = image_id or f"(line {n})"
        lines.setdefault(key, []).append(n)
        if len(lines[key]) > 1:
            rows.pop(key, None)
            faults[key] = f"on {len(lines[key])} rows (lines {', '.join(map(str, lines[key][:5]))})"
        elif len(r) != len(COLUMNS):
            faults[key] = f"line {n}: {len(r)} fields, expected {len(COLUMNS)}"
        elif not image_id:
            faults[key] = f"line {n}: no ID"
        else:
            try:
                rows[key] = (int(r[1]), int(r[2]), r[3])
            except ValueError:
                faults[key] = f"line {n}: width/height {r[1]!r}, {r[2]!r} are not integers"
    return rows, faults


def read_submission(path: str | os.PathLike) -> dict[str, Row]:
    """The rows of a submission CSV written by :func:`write_submission`: ``{ID: (width,
    height, predstring)}``. Strict: ``ValueError`` naming the first fault
    :func:`read_submission_rows` finds (another header, a repeated ID, a bad row)."""
    rows, faults = read_submission_rows(path)
    if faults:
        image_id, fault = next(iter(faults.items()))
        more = f" (and {len(faults) - 1} more bad row(s))" if len(faults) > 1 else ""
        raise ValueError(f"{path}: ID {image_id}: {fault}{more}")
    return rows
