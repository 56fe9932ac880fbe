"""The per-cell export (``submit --save-cells DIR``): its one writer and its one reader.

Folder layout::

    DIR/labels/<ID>.png           uint16 cell label image at the working size (e.g. 512x512)
    DIR/images.csv                ID,ImageWidth,ImageHeight,n_cells,table_end -- one line per
                                  finished image, the original size; the commit record
    DIR/cells.csv                 the cell table (CSV), or
    DIR/cells.parquet/<ID>.parquet  the cell table (Parquet: one file per image, read as one
                                  table by ``pd.read_parquet("DIR/cells.parquet")``)

The table is Parquet when ``pyarrow`` is importable, else CSV (``CellsWriter.format`` and a
log line say which; :func:`read_cells` reads either). One row per cell, columns in order:

=====================  ===================================================================
``ID``                 image ID
``cell_id``            the cell's label in ``labels/<ID>.png``
``y0 x0 y1 x1``        bounding box at the ORIGINAL size, half-open (rows ``y0:y1``)
``area``               pixels at the original size (the label image scaled up with nearest
                       neighbour, as ``rle.encode_label_image`` does)
``score_00..score_18`` the final score per class (what the submission lists)
``<model>_<step>_<cc>`` per model and step (``step1``, ``step2``, ``ens`` = the model's
                       Step 1 + Step 2 ensemble), class ``cc`` = 00..18; NaN when that step
                       did not run for the image
=====================  ===================================================================

Scores are float32 (CSV: ``%.9g``, which round-trips float32 exactly). Pandas users: the
columns of one kind are ``score_columns(model, step)``; ``scores(df, model, step)`` gives
the ``(n, 19)`` array.

Written incrementally: per image the label PNG (atomic), the table rows (appended, fsynced),
then its ``images.csv`` line (fsynced) -- an image counts as present only once that line
is complete. A rerun with ``resume=True`` skips present images and drops whatever a killed
run left after the last complete line (CSV: the table is cut back to ``table_end`` bytes).

A writer given a ``fingerprint`` (the run's settings, e.g.
``hpa_kernel.run.pipeline.cells_fingerprint``) keeps it in ``DIR/fingerprint.json``; an
export with another fingerprint, or one without any that already lists images, is never
resumed into: :class:`ExportMismatch` (one line) unless ``overwrite=True``, which starts
the table afresh. :func:`check_export` is the same check without opening anything.

No file of the folder is opened through a symbolic link, and only regular files are
(:func:`~hpa_kernel.formats.atomic.open_regular`): a link or FIFO in the folder is refused
with a one-line ``OSError``, never followed and never waited on; ``labels/`` and
``cells.parquet/`` must be real folders.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.atomic import atomic_write, check_real_folder, open_regular, read_regular
from hpa_kernel.formats.images import is_safe_id
from hpa_kernel.stages.labels import label_boxes, resize_labels

__all__ = [
    "STEPS",
    "FORMATS",
    "BASE_COLUMNS",
    "pyarrow_available",
    "score_columns",
    "scores",
    "CellsWriter",
    "CellsTable",
    "ExportMismatch",
    "check_export",
    "read_cells",
    "read_labels",
]

logger = logging.getLogger(__name__)

STEPS: tuple[str, ...] = ("step1", "step2", "ens")
FORMATS: tuple[str, ...] = ("parquet", "csv")
BASE_COLUMNS: tuple[str, ...] = ("ID", "cell_id", "y0", "x0", "y1", "x1", "area")
INDEX_COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "n_cells", "table_end")
INDEX_NAME = "images.csv"
LABELS_DIR = "labels"
CSV_NAME = "cells.csv"
PARQUET_DIR = "cells.parquet"
FINGERPRINT_NAME = "fingerprint.json"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
_FLOAT_FORMAT = "%.9g"


def pyarrow_available() -> bool:
    """Whether Parquet can be written/read here (``pyarrow`` importable)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def score_columns(model: str | None = None, step: str | None = None) -> list[str]:
    """The 19 column names of one score kind: final (``model=None``) or ``<model>_<step>_cc``."""
    if model is None:
        return [f"score_{c:02d}" for c in range(NUM_CLASSES)]
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    return [f"{model}_{step}_{c:02d}" for c in range(NUM_CLASSES)]


def scores(cells: pd.DataFrame, model: str | None = None, step: str | None = None) -> np.ndarray:
    """``(n, 19)`` float32 scores of the table's rows (final by default, else model/step)."""
    return cells[score_columns(model, step)].to_numpy(dtype=np.float32)


def _columns(models: Sequence[str]) -> list[str]:
    cols = list(BASE_COLUMNS) + score_columns()
    for m in models:
        for s in STEPS:
            cols += score_columns(m, s)
    return cols


def _check_id(image_id: str) -> str:
    """``image_id`` if it may name a file (:func:`~hpa_kernel.formats.images.is_safe_id`, the one rule)."""
    image_id = str(image_id)
    if not is_safe_id(image_id):
        raise ValueError(f"image ID {image_id!r} cannot name a file")
    return image_id


def _models_of(columns: Sequence[str]) -> list[str]:
    """Model names in column order, from ``<model>_<step>_cc`` columns."""
    names = [c.rsplit("_", 2)[0] for c in columns[len(BASE_COLUMNS) + NUM_CLASSES :: NUM_CLASSES * len(STEPS)]]
    if _columns(names) != list(columns):
        raise ValueError(f"not a cells table (columns {list(columns)[:10]} ...)")
    return names


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c == "ID" else np.int64) for c in INDEX_COLUMNS})


def _read_index(folder: Path) -> pd.DataFrame:
    """The complete lines of ``images.csv`` (a line cut by a kill, and what follows, is dropped)."""
    path = folder / INDEX_NAME
    if not os.path.lexists(path):
        return _empty_index()
    raw = read_regular(path)
    raw = raw[: raw.rfind(b"\n") + 1]
    df = pd.read_csv(io.BytesIO(raw), dtype={"ID": str}, keep_default_na=False)
    if list(df.columns) != list(INDEX_COLUMNS):
        raise ValueError(f"{path}: columns {list(df.columns)}, expected {list(INDEX_COLUMNS)}")
    return df.drop_duplicates("ID", keep="first").reset_index(drop=True)


def _detect_format(folder: Path) -> str | None:
    has_csv, has_pq = os.path.lexists(folder / CSV_NAME), os.path.lexists(folder / PARQUET_DIR)
    if has_csv and has_pq:
        raise ValueError(f"{folder} holds both {CSV_NAME} and {PARQUET_DIR}/")
    return "csv" if has_csv else "parquet" if has_pq else None


class ExportMismatch(ValueError):
    """The export folder holds the export of other settings (one line, naming the folder)."""


def _read_fingerprint(folder: Path) -> str | None:
    path = folder / FINGERPRINT_NAME
    if not os.path.lexists(path):
        return None
    try:
        value = json.loads(read_regular(path).decode("utf-8")).get("fingerprint")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value:
        raise ExportMismatch(f"{path} is not a fingerprint file; use --overwrite-cells or another folder")
    return value


def check_export(folder: str | os.PathLike, fingerprint: str) -> None:
    """Raise :class:`ExportMismatch` when ``folder`` holds an export that a run with
    ``fingerprint`` must not resume into: another fingerprint, or none while images are
    listed (an export of unknown settings). A folder that is missing, not a folder, holds
    no export or cannot be read as one passes (the writer refuses it, naming the fault)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    try:
        found = _read_fingerprint(folder)
        listed = found is None and _detect_format(folder) is not None and len(_read_index(folder)) > 0
    except (OSError, ValueError) as e:
        if isinstance(e, ExportMismatch):
            raise
        return  # not readable as an export: the writer refuses it, naming the fault
    if found == fingerprint:
        return
    if found is not None:
        raise ExportMismatch(f"per-cell export {folder} was written with other settings (manifest, data or options); "
                             "use --overwrite-cells to replace it, or another --save-cells folder")
    if listed:
        raise ExportMismatch(f"per-cell export {folder} has no fingerprint of the settings it was written with; "
                             "use --overwrite-cells to replace it, or another --save-cells folder")


def _open_append(path: Path, truncate: int | None = None):
    """``path`` opened for appending (created; a regular file only), cut to ``truncate`` bytes."""
    fh = os.fdopen(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")
    if truncate is not None:
        fh.truncate(truncate)
    return fh


def _cell_table(image_id: str, labels: np.ndarray, ids: np.ndarray, width: int, height: int) -> pd.DataFrame:
    """The base columns of one image's cells: ID, cell_id, the box and the area at the
    original size (the labels nearest-scaled once; a cell without pixels there: area 0)."""
    n = ids.size
    big = resize_labels(labels, width, height) if n else None
    table: dict[str, np.ndarray] = {"ID": np.full(n, image_id, dtype=object), "cell_id": ids}
    boxes = label_boxes(big, ids) if n else np.zeros((0, 4), np.int64)
    for k, name in enumerate(("y0", "x0", "y1", "x1")):
        table[name] = boxes[:, k]
    if n:
        counts = np.bincount(big.ravel(), minlength=int(ids.max()) + 1)
        table["area"] = counts[np.clip(ids, 0, None)] * (ids > 0)
    else:
        table["area"] = np.zeros(0, np.int64)
    return pd.DataFrame(table)


class CellsWriter:
    """Append one image at a time to a per-cell export folder.

    Parameters
    ----------
    folder:
        The export folder (created).
    models:
        Model names, in order (letters, digits, ``.`` and ``-``; e.g. ``m0, m1``); they name
        the ``<model>_<step>_cc`` columns.
    fmt:
        ``"auto"`` (Parquet if pyarrow is importable, else CSV), ``"parquet"`` or ``"csv"``.
        Resuming keeps the format already on disk.
    resume:
        Keep the images already present (skip them); ``False`` starts the table afresh.
    fingerprint:
        The settings the scores come from (see the module docstring); ``None``: not kept,
        not checked.
    overwrite:
        With ``fingerprint``: replace an export of other settings instead of refusing it.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike, models: Sequence[str] = (), fmt: str = "auto", resume: bool = True,
                 fingerprint: str | None = None, overwrite: bool = False):
        self.folder = Path(folder)
        self.models = [str(m) for m in models]
        for m in self.models:
            if not _MODEL_NAME.match(m):
                raise ValueError(f"model name {m!r}: use letters, digits, '.' and '-' only")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"model names repeat: {self.models}")
        if fmt not in ("auto",) + FORMATS:
            raise ValueError(f"fmt must be auto, parquet or csv, got {fmt!r}")
        self.columns = _columns(self.models)
        check_real_folder(self.folder / LABELS_DIR)
        if fingerprint is not None and not overwrite:
            check_export(self.folder, fingerprint)
        if not resume or overwrite:
            self._clear()
        if fingerprint is not None and _read_fingerprint(self.folder) != fingerprint:
            atomic_write(self.folder / FINGERPRINT_NAME, (json.dumps({"fingerprint": fingerprint}) + "\n").encode())
        on_disk = _detect_format(self.folder)
        index = _read_index(self.folder) if on_disk else _empty_index()
        if on_disk and fmt != "auto" and fmt != on_disk:
            raise ValueError(f"{self.folder} already holds a {on_disk} table (asked for {fmt}); use resume=False")
        self.format = on_disk or ("parquet" if fmt == "parquet" or (fmt == "auto" and pyarrow_available()) else "csv")
        if self.format == "parquet" and not pyarrow_available():
            raise ValueError("Parquet needs pyarrow, which is not installed (use fmt='csv')")
        self.done: set[str] = set(index["ID"])
        self._index_fh = None
        self._table_fh = None
        self._open(index, fresh=on_disk is None)
        why = " (pyarrow not installed)" if self.format == "csv" and not pyarrow_available() else ""
        logger.info("per-cell export to %s: %s table%s, %d image(s) already present",
                    self.folder, self.format, why, len(self.done))

    # ------------------------------------------------------------------ set-up
    def _clear(self) -> None:
        (self.folder / FINGERPRINT_NAME).unlink(missing_ok=True)
        (self.folder / INDEX_NAME).unlink(missing_ok=True)
        (self.folder / CSV_NAME).unlink(missing_ok=True)
        pq = self.folder / PARQUET_DIR
        if os.path.lexists(pq):
            check_real_folder(pq)
            for p in pq.glob("*.parquet"):
                p.unlink()
            if not any(pq.iterdir()):
                pq.rmdir()

    def _open(self, index: pd.DataFrame, fresh: bool) -> None:
        index_path = self.folder / INDEX_NAME
        # cut a line a kill left half-written, so the next line starts clean
        keep = 0
        if os.path.lexists(index_path):
            raw = read_regular(index_path)
            keep = raw.rfind(b"\n") + 1
        self._index_fh = _open_append(index_path, truncate=keep)
        if keep == 0:
            self._index_fh.write((",".join(INDEX_COLUMNS) + "\n").encode())
            self._index_fh.flush()
        if self.format == "csv":
            path = self.folder / CSV_NAME
            end = int(index["table_end"].iloc[-1]) if len(index) else 0
            head = (",".join(self.columns) + "\n").encode()
            if fresh or not os.path.lexists(path):
                self._table_fh = _open_append(path, truncate=0)
                self._table_fh.write(head)
                self._table_fh.flush()
            else:
                raw = read_regular(path)
                header = raw[: raw.find(b"\n")].decode("utf-8", "replace").split(",")
                if header != self.columns:
                    raise ValueError(f"{path}: its columns (models {_models_of(header)}) differ from this run's "
                                     f"(models {self.models}); use another folder or resume=False")
                self._table_fh = _open_append(path, truncate=max(end, len(head)))
        else:
            check_real_folder(self.folder / PARQUET_DIR)
            if not fresh and self.done:
                first = sorted(self.done)[0]
                part = self.folder / PARQUET_DIR / f"{first}.parquet"
                if os.path.lexists(part):
                    header = list(pd.read_parquet(io.BytesIO(read_regular(part))).columns)
                    if header != self.columns:
                        raise ValueError(f"{part}: its models {_models_of(header)} differ from this run's "
                                         f"{self.models}; use another folder or resume=False")

    # ------------------------------------------------------------------ writing
    def __contains__(self, image_id: str) -> bool:
        return str(image_id) in self.done

    def write_image(
        self,
        image_id: str,
        labels: np.ndarray,
        orig_size: tuple[int, int],
        cell_ids: np.ndarray | Sequence[int],
        final: np.ndarray,
        per_model: Mapping[str, Mapping[str, np.ndarray | None]] | None = None,
    ) -> bool:
        """Add one image; returns ``False`` (and writes nothing) if it is already present.

        Parameters
        ----------
        image_id:
            The image ID (names ``labels/<ID>.png``).
        labels:
            ``(h, w)`` label image at the working size (0 = background, labels <= 65535).
        orig_size:
            ``(width, height)`` of the original image.
        cell_ids:
            ``(n,)`` the cells to list; row ``i`` of every score array is ``cell_ids[i]``.
        final:
            ``(n, 19)`` final scores (the submission's).
        per_model:
            ``{model: {step: (n, 19) or None}}`` for ``step`` in :data:`STEPS`; a model or
            step left out (or ``None``) is written as NaN.
        """
        image_id = _check_id(image_id)
        if image_id in self.done:
            logger.debug("cells of %s already present; skipped", image_id)
            return False
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"labels must be in 0..65535 for a uint16 PNG (range {labels.min()}..{labels.max()})")
        width, height = (int(v) for v in orig_size)
        if width <= 0 or height <= 0:
            raise ValueError(f"orig_size must be positive (width, height), got {orig_size}")
        ids = np.asarray(cell_ids, dtype=np.int64).reshape(-1)
        values = self._score_matrix(ids.size, final, per_model)
        df = pd.concat([_cell_table(image_id, labels, ids, width, height),
                        pd.DataFrame(values, columns=self.columns[len(BASE_COLUMNS):])], axis=1)
        self._append(image_id, labels, df, (width, height))
        return True

    def _score_matrix(
        self, n: int, final: np.ndarray, per_model: Mapping[str, Mapping[str, np.ndarray | None]] | None
    ) -> np.ndarray:
        """``(n, 19 * (1 + models * steps))``: the final scores, then each model's steps (NaN where absent)."""
        final = np.asarray(final, dtype=np.float32)
        if final.shape != (n, NUM_CLASSES):
            raise ValueError(f"final scores must have shape ({n}, {NUM_CLASSES}), got {final.shape}")
        per_model = dict(per_model or {})
        unknown = set(per_model) - set(self.models)
        if unknown:
            raise ValueError(f"unknown model(s) {sorted(unknown)}; this writer has {self.models}")
        mats = [final]
        for m in self.models:
            steps = dict(per_model.get(m) or {})
            bad = set(steps) - set(STEPS)
            if bad:
                raise ValueError(f"model {m}: unknown step(s) {sorted(bad)}; steps are {STEPS}")
            for s in STEPS:
                v = steps.get(s)
                v = np.full((n, NUM_CLASSES), np.nan, np.float32) if v is None else np.asarray(v, dtype=np.float32)
                if v.shape != (n, NUM_CLASSES):
                    raise ValueError(f"model {m} {s}: shape {v.shape}, expected ({n}, {NUM_CLASSES})")
                mats.append(v)
        return np.concatenate(mats, axis=1) if n else np.zeros((0, len(mats) * NUM_CLASSES), np.float32)

    def _append(self, image_id: str, labels: np.ndarray, df: pd.DataFrame, size: tuple[int, int]) -> None:
        """Write one image: its label PNG, its rows (CSV appended, or one Parquet file), its index line."""
        ok, png = cv2.imencode(".png", labels.astype(np.uint16))
        if not ok:
            raise OSError(f"could not encode the label image of {image_id}")
        atomic_write(self.folder / LABELS_DIR / f"{image_id}.png", png.tobytes())
        n, table_end = len(df), 0
        if self.format == "csv":
            if n:
                text = df.to_csv(header=False, index=False, float_format=_FLOAT_FORMAT, na_rep="nan", lineterminator="\n")
                self._table_fh.write(text.encode())
            self._table_fh.flush()
            os.fsync(self._table_fh.fileno())
            table_end = self._table_fh.tell()
        elif n:
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            atomic_write(self.folder / PARQUET_DIR / f"{image_id}.parquet", buf.getvalue())
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow((image_id, *size, n, table_end))
        self._index_fh.write(line.getvalue().encode())
        self._index_fh.flush()
        os.fsync(self._index_fh.fileno())
        self.done.add(image_id)

    def close(self) -> None:
        for fh in (self._index_fh, self._table_fh):
            if fh is not None:
                fh.close()
        self._index_fh = self._table_fh = None

    def __enter__(self) -> "CellsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- reading


@dataclass
class CellsTable:
    """A per-cell export as read back: ``images`` (``ID, ImageWidth, ImageHeight, n_cells``,
    one row per finished image, in writing order), ``cells`` (the table, only finished
    images), ``models`` (names, in column order) and ``format``."""

    folder: Path
    format: str
    images: pd.DataFrame
    cells: pd.DataFrame
    models: list[str]


def read_cells(folder: str | os.PathLike) -> CellsTable:
    """Read a per-cell export folder (either format). ``ValueError`` (one line) if it is not one."""
    folder = Path(folder)
    fmt = _detect_format(folder) if folder.is_dir() else None
    if fmt is None or not (folder / INDEX_NAME).is_file():
        raise ValueError(f"{folder} is not a per-cell export (no {INDEX_NAME} with {CSV_NAME} or {PARQUET_DIR}/)")
    index = _read_index(folder)
    if fmt == "csv":
        path = folder / CSV_NAME
        end = int(index["table_end"].iloc[-1]) if len(index) else None
        raw = read_regular(path)
        header_end = raw.find(b"\n") + 1
        raw = raw[: max(end, header_end)] if end is not None else raw[:header_end]
        cells = pd.read_csv(io.BytesIO(raw), dtype={"ID": str}, keep_default_na=False, na_values=["nan"])
    else:
        if not pyarrow_available():
            raise ValueError(f"{folder / PARQUET_DIR} is Parquet, which needs pyarrow (not installed)")
        parts = [folder / PARQUET_DIR / f"{i}.parquet" for i in index.loc[index["n_cells"] > 0, "ID"]]
        missing = [p for p in parts if not os.path.lexists(p)]
        if missing:
            raise ValueError(f"{missing[0]}: listed in {INDEX_NAME} but missing")
        cells = pd.concat([pd.read_parquet(io.BytesIO(read_regular(p))) for p in parts], ignore_index=True) if parts else None
        if cells is None:
            first = next((folder / PARQUET_DIR).glob("*.parquet"), None)
            cells = pd.read_parquet(first).iloc[:0] if first else pd.DataFrame(columns=_columns([]))
    models = _models_of(list(cells.columns))
    cells = cells[cells["ID"].isin(set(index["ID"]))].reset_index(drop=True)
    for c in BASE_COLUMNS[1:]:
        cells[c] = cells[c].astype(np.int64)
    float_cols = list(cells.columns[len(BASE_COLUMNS):])
    cells[float_cols] = cells[float_cols].astype(np.float32)
    return CellsTable(folder=folder, format=fmt, images=index.drop(columns="table_end"), cells=cells, models=models)


def read_labels(folder: str | os.PathLike, image_id: str) -> np.ndarray:
    """``labels/<ID>.png`` of an export folder: the uint16 label image at the working size."""
    path = Path(folder) / LABELS_DIR / f"{_check_id(image_id)}.png"
    try:
        raw = np.frombuffer(read_regular(path), np.uint8)
    except FileNotFoundError:
        raw = np.zeros(0, np.uint8)
    labels = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if labels is None or labels.ndim != 2:
        raise ValueError(f"{path}: missing or not a single-channel label image")
    return labels
