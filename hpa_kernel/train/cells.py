"""Cell tables for Step-2-like training samples (single-cell crops).

    python -m hpa_kernel.train.cells --index CACHE/index.csv --truth DIR [--max-per-image 12]
    python -m hpa_kernel.train.cells --index CACHE/index.csv --segment [--max-per-image 12]

For each cached image this writes a label image at the cache size
(``CACHE/cells/<ID>.npy``, int32, nearest-resized) and one row per cell to
``CACHE/cells.csv``: ``ID,cell_id,Label,path,mask[,fold]``.

- ``--truth DIR``: cells and **per-cell** labels from a truth folder
  (``DIR/labels/<ID>.png`` + ``DIR/cells.csv``, the layout of
  :func:`hpa_kernel.synthetic.write_dataset`). Real HPA training data has no such truth.
- ``--segment``: cells from the kernel's segmenter (weight-free classic unless weights
  are given) and the **image** labels for every cell (weak labels, the real-data case).

Cells smaller than ``--min-area`` pixels (at the cache size) are left out; at most
``--max-per-image`` cells per image are kept (the largest).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_kernel.classes import format_labels, parse_labels
from hpa_kernel.formats.images import resize_rgby
from hpa_kernel.stages.labels import present_ids, resize_labels
from hpa_kernel.train.dataset import load_index

__all__ = ["truth_cells", "segmented_cells", "build_cell_table", "main"]

logger = logging.getLogger(__name__)


def truth_cells(truth_dir: Path, image_id: str, size: int, cell_labels: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """Truth label image at ``size`` and ``{cell_id: Label}`` of the cells still present."""
    path = Path(truth_dir) / "labels" / f"{image_id}.png"
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise FileNotFoundError(f"truth label image {path} missing or unreadable")
    lab = resize_labels(lab, size, size).astype(np.int32, copy=False)
    present = set(present_ids(lab).tolist())
    return lab, {c: t for c, t in cell_labels.items() if c in present}


def segmented_cells(segmenter, image: np.ndarray, image_label: str) -> tuple[np.ndarray, dict[int, str]]:
    """Segmenter cells of a cached ``(S, S, 4)`` uint8/uint16 image, every cell with the image's labels."""
    res = segmenter.segment(resize_rgby(image, image.shape[0])[None], [(image.shape[1], image.shape[0])])[0]
    ids = present_ids(res.cells).tolist()
    return res.cells.astype(np.int32), {c: image_label for c in ids}


def build_cell_table(
    index_csv: str | Path,
    truth: str | Path | None = None,
    segmenter=None,
    max_per_image: int = 12,
    min_area: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the label images and ``cells.csv`` next to ``index_csv``; returns the table."""
    if (truth is None) == (segmenter is None):
        raise ValueError("give exactly one of truth (a folder) or segmenter")
    index_csv = Path(index_csv)
    root = index_csv.parent
    index = load_index(index_csv)
    (root / "cells").mkdir(exist_ok=True)
    per_cell: dict[str, dict[int, str]] = {}
    if truth is not None:
        tc = pd.read_csv(Path(truth) / "cells.csv")
        for iid, cid, lab in zip(tc["ID"].astype(str), tc["cell_id"].astype(int), tc["Label"].astype(str)):
            per_cell.setdefault(iid, {})[cid] = format_labels(parse_labels(lab))
    rows = []
    for rec in tqdm(index.itertuples(index=False), total=len(index), desc="cells", disable=not progress):
        image = np.load(rec.path)
        size = image.shape[0]
        if truth is not None:
            labels, cell_labels = truth_cells(Path(truth), rec.ID, size, per_cell.get(str(rec.ID), {}))
        else:
            labels, cell_labels = segmented_cells(segmenter, image, str(rec.Label))
        areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
        keep = sorted((c for c in cell_labels if areas[c] >= min_area), key=lambda c: -areas[c])[:max_per_image]
        mask_rel = Path("cells") / f"{rec.ID}.npy"
        np.save(root / mask_rel, labels)
        for c in sorted(keep):
            row = {"ID": rec.ID, "cell_id": c, "Label": cell_labels[c], "path": os.path.relpath(rec.path, root),
                   "mask": str(mask_rel)}
            if "fold" in index.columns:
                row["fold"] = int(rec.fold)
            rows.append(row)
    table = pd.DataFrame(rows, columns=["ID", "cell_id", "Label", "path", "mask"] + (["fold"] if "fold" in index.columns else []))
    table.to_csv(root / "cells.csv", index=False)
    logger.info("%d cells from %d images -> %s", len(table), len(index), root / "cells.csv")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.cells", description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, type=Path, help="index.csv written by hpa_kernel.train.prepare")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--truth", type=Path, help="truth folder (labels/<ID>.png + cells.csv)")
    src.add_argument("--segment", action="store_true", help="segment with the kernel's segmenter; image labels")
    ap.add_argument("--max-per-image", type=int, default=12)
    ap.add_argument("--min-area", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    segmenter = None
    if args.segment:
        from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

        segmenter = Segmenter()
    table = build_cell_table(args.index, args.truth, segmenter, args.max_per_image, args.min_area)
    print(f"{len(table)} cells -> {args.index.parent / 'cells.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
