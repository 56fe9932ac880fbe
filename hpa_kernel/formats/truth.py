"""The truth folder (per-cell ground truth): the one reader and the one writer; and the
writer of the image labels (``train.csv``, read by :func:`hpa_kernel.train.prepare.read_label_csv`).

Layout::

    DIR/labels/<ID>.png   label image at the original size (uint16 written; uint8 read too),
                          0 = background, 1..n = cells
    DIR/cells.csv         ID,cell_id,Label  (Label '|'-separated class ids)
    train.csv             ID,Label  (image labels, '|'-separated)

Written by :mod:`hpa_kernel.tools.synthetic`; read by :mod:`hpa_kernel.tools.metric`,
:mod:`hpa_kernel.train.cells` and :mod:`hpa_kernel.train.fit_weights`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import cv2
import numpy as np
import pandas as pd

from hpa_kernel.classes import format_labels, parse_labels
from hpa_kernel.formats.images import write_channel

TRUTH_COLUMNS: tuple[str, ...] = ("ID", "cell_id", "Label")


class TruthError(ValueError):
    """The truth folder is missing or malformed (the message says which file and why)."""


def label_path(truth_dir: str | Path, image_id: str) -> Path:
    """``DIR/labels/<ID>.png``."""
    return Path(truth_dir) / "labels" / f"{image_id}.png"


def read_truth_index(truth_dir: str | Path) -> dict[str, dict[int, list[int]]]:
    """Read ``DIR/cells.csv`` -> image id -> {cell id: classes}, only images with ground truth.

    Rows of the same (ID, cell_id) are merged. Raises :class:`TruthError` when the folder,
    the CSV, a column or a label PNG of an image with ground truth is missing, or a row is
    malformed.
    """
    root = Path(truth_dir)
    if not root.is_dir():
        raise TruthError(f"truth folder {root} does not exist")
    csv = root / "cells.csv"
    if not csv.is_file():
        raise TruthError(f"truth file {csv} does not exist")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types
        raise TruthError(f"{csv}: cannot read CSV: {e}") from None
    missing = [c for c in TRUTH_COLUMNS if c not in df.columns]
    if missing:
        raise TruthError(f"{csv}: missing column(s) {', '.join(missing)}")
    index: dict[str, dict[int, list[int]]] = {}
    for line, (image_id, cell, label) in enumerate(df[list(TRUTH_COLUMNS)].itertuples(index=False), start=2):
        try:
            cell_id = int(cell)
            classes = parse_labels(label)
        except ValueError as e:
            raise TruthError(f"{csv} line {line}: {e}") from None
        if cell_id <= 0:
            raise TruthError(f"{csv} line {line}: cell_id {cell_id} must be >= 1")
        if classes:
            cells = index.setdefault(image_id, {})
            cells[cell_id] = sorted(set(cells.get(cell_id, [])) | set(classes))
    for image_id in index:
        if not label_path(root, image_id).is_file():
            raise TruthError(f"truth label image {label_path(root, image_id)} does not exist")
    return index


def read_label_image(truth_dir: str | Path, image_id: str) -> np.ndarray:
    """Read ``DIR/labels/<ID>.png`` unchanged (uint16/uint8 label image)."""
    path = label_path(truth_dir, image_id)
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise TruthError(f"{path}: cannot read the label image")
    if labels.ndim != 2:
        raise TruthError(f"{path}: label image must be single-channel, got shape {labels.shape}")
    return labels


def write_label_image(truth_dir: str | Path, image_id: str, labels: np.ndarray) -> Path:
    """Write ``DIR/labels/<ID>.png`` (uint16, fast PNG compression); returns the path."""
    path = label_path(truth_dir, image_id)
    if labels.ndim != 2 or (labels.size and (labels.min() < 0 or labels.max() > 65535)):
        raise TruthError(f"{path}: label image must be 2-D with ids in 0..65535")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_channel(path, labels.astype(np.uint16))


def write_truth_index(truth_dir: str | Path, cells: Mapping[str, Mapping[int, Iterable[int]]]) -> Path:
    """Write ``DIR/cells.csv`` from image id -> {cell id: classes} (rows in the given order)."""
    path = Path(truth_dir) / "cells.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(iid, int(cid), format_labels(cls)) for iid, per in cells.items() for cid, cls in per.items()]
    pd.DataFrame(rows, columns=list(TRUTH_COLUMNS)).to_csv(path, index=False)
    return path


def write_image_labels(path: str | Path, labels: Mapping[str, Iterable[int]]) -> Path:
    """Write ``ID,Label`` rows (``train.csv``) from image id -> classes, in the given order."""
    rows = [(iid, format_labels(cls)) for iid, cls in labels.items()]
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)
    return Path(path)
