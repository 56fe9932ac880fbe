"""Cell tables over the RGBY cache: one label image per cached image, one row per cell.

    python -m hpa_kernel.train.cells --index CACHE/index.csv --segment [--nuclei N.pth --cell C.pth]
        [--device auto] [--workers 4] [--batch-size 8] [--max-per-image 12]
    python -m hpa_kernel.train.cells --index CACHE/index.csv --truth DIR [--max-per-image 12]

For each cached image this writes a label image at the cache size
(``CACHE/cells/<ID>.npy``, **uint16**, nearest-resized: 0.5 MB per 512 px image instead of
1 MB as int32) and one row per cell to ``CACHE/cells.csv``:
``ID,cell_id,Label,path,mask[,fold]``.

- ``--segment``: cells from the kernel's segmenter (the hpacellseg U-Nets with
  ``--nuclei/--cell``, on the GPU when one is usable with ``--device auto``; the weight-free
  classic segmenter otherwise) and the **image** labels for every cell (weak labels, the
  real-data case). ``--workers N`` runs N processes over shards of the index, each with
  its own segmenter (U-Nets on the same GPU) and the CPU post-processing in parallel.
  The image's original size (``width/height`` of the index) sets the threshold scale, as
  in the kernel.
- ``--truth DIR``: cells and **per-cell** labels from a synthetic truth folder
  (``DIR/labels/<ID>.png`` + ``DIR/cells.csv``, the layout of
  :func:`hpa_kernel.tools.synthetic.write_dataset`). Per-cell truth is for **evaluation only**
  (the trainer's ``val_cells_csv``); no training reads it, and real HPA data has none.

Cells smaller than ``--min-area`` pixels (at the cache size) are left out; at most
``--max-per-image`` cells per image are kept (the largest).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_kernel.classes import format_labels
from hpa_kernel.formats.images import resize_rgby
from hpa_kernel.formats.truth import read_label_image, read_truth_index
from hpa_kernel.stages.labels import resize_labels
from hpa_kernel.stages.labels import present_ids
from hpa_kernel.train.dataset import load_index

__all__ = ["SegmentOptions", "truth_cells", "segmented_cells", "build_cell_table", "main"]

logger = logging.getLogger(__name__)
COLUMNS = ["ID", "cell_id", "Label", "path", "mask"]


@dataclass(frozen=True)
class SegmentOptions:
    """How ``--segment`` runs: weights (None = classic), device, processes, images per batch."""

    nuclei: str | None = None
    cell: str | None = None
    device: str = "cpu"
    workers: int = 1
    batch_size: int = 8
    fp16: bool = False

    def segmenter(self):
        from hpa_kernel.config import SegmentationConfig
        from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

        if (self.nuclei is None) != (self.cell is None):
            raise ValueError("--nuclei and --cell go together")
        cfg = (SegmentationConfig(method="hpa", nuclei=Path(self.nuclei), cell=Path(self.cell),
                                  batch_size=self.batch_size)
               if self.cell else SegmentationConfig())
        return Segmenter(cfg, device=self.device, fp16=self.fp16)


def truth_cells(truth_dir: Path, image_id: str, size: int, cell_labels: dict[int, str]) -> tuple[np.ndarray, dict[int, str]]:
    """Truth label image at ``size`` and ``{cell_id: Label}`` of the cells still present."""
    lab = resize_labels(read_label_image(truth_dir, image_id), size, size)
    present = set(present_ids(lab).tolist())
    return lab, {c: t for c, t in cell_labels.items() if c in present}


def segmented_cells(segmenter, images: Sequence[np.ndarray], labels: Sequence[str],
                    sizes: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, dict[int, str]]]:
    """Segmenter cells of cached ``(S, S, 4)`` images (one batch), every cell with its image's labels."""
    batch = np.stack([resize_rgby(im, im.shape[0]) for im in images])
    out = []
    for res, label in zip(segmenter.segment(batch, list(sizes)), labels):
        out.append((res.cells, {int(c): label for c in present_ids(res.cells)}))
    return out


def _as_uint16(labels: np.ndarray, image_id: str) -> np.ndarray:
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{image_id}: {top} cells do not fit a uint16 label image")
    return labels.astype(np.uint16, copy=False)


def _rows(rec: dict[str, Any], root: Path, labels: np.ndarray, cell_labels: dict[int, str],
          max_per_image: int, min_area: int) -> list[dict[str, Any]]:
    """Save the label image, return the kept cells' rows."""
    areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    keep = sorted((c for c in cell_labels if areas[c] >= min_area), key=lambda c: -areas[c])[:max_per_image]
    mask_rel = Path("cells") / f"{rec['ID']}.npy"
    np.save(root / mask_rel, _as_uint16(labels, rec["ID"]))
    rows = []
    for c in sorted(keep):
        row = {"ID": rec["ID"], "cell_id": int(c), "Label": cell_labels[c],
               "path": os.path.relpath(rec["path"], root), "mask": str(mask_rel)}
        if "fold" in rec:
            row["fold"] = int(rec["fold"])
        rows.append(row)
    return rows


def _segment_shard(records: list[dict[str, Any]], root: Path, opts: SegmentOptions, max_per_image: int,
                   min_area: int) -> list[dict[str, Any]]:
    """One worker's share: its own segmenter, batches of ``opts.batch_size`` images."""
    import cv2 as _cv2

    _cv2.setNumThreads(1)
    segmenter = opts.segmenter()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(records), opts.batch_size):
        chunk = records[start : start + opts.batch_size]
        images = [np.load(r["path"]) for r in chunk]
        sizes = [(int(r.get("width") or im.shape[1]), int(r.get("height") or im.shape[0]))
                 for r, im in zip(chunk, images)]
        for rec, (labels, cell_labels) in zip(chunk, segmented_cells(segmenter, images, [r["Label"] for r in chunk],
                                                                     sizes)):
            rows.extend(_rows(rec, root, labels, cell_labels, max_per_image, min_area))
    return rows


def build_cell_table(
    index_csv: str | Path,
    truth: str | Path | None = None,
    segment: SegmentOptions | None = None,
    max_per_image: int = 12,
    min_area: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the label images and ``cells.csv`` next to ``index_csv``; returns the table.

    Give exactly one of ``truth`` (a synthetic truth folder) or ``segment`` (options).
    """
    if (truth is None) == (segment is None):
        raise ValueError("give exactly one of truth (a folder) or segment (options)")
    index_csv = Path(index_csv)
    root = index_csv.parent
    index = load_index(index_csv)
    (root / "cells").mkdir(exist_ok=True)
    records = index.assign(ID=index["ID"].astype(str), Label=index["Label"].astype(str)).to_dict("records")
    rows: list[dict[str, Any]] = []
    if truth is not None:
        per_cell = {iid: {cid: format_labels(cls) for cid, cls in cells.items()}
                    for iid, cells in read_truth_index(truth).items()}
        for rec in tqdm(records, desc="cells (truth)", disable=not progress):
            size = int(np.load(rec["path"], mmap_mode="r").shape[0])
            labels, cell_labels = truth_cells(Path(truth), rec["ID"], size, per_cell.get(rec["ID"], {}))
            rows.extend(_rows(rec, root, labels, cell_labels, max_per_image, min_area))
    else:
        from joblib import Parallel, delayed

        size = 4 * segment.batch_size  # shards small enough for the progress bar to move
        shards = [records[i : i + size] for i in range(0, len(records), size)]
        if segment.workers > 1:
            parts = Parallel(n_jobs=segment.workers, return_as="generator")(
                delayed(_segment_shard)(s, root, segment, max_per_image, min_area) for s in shards)
        else:
            parts = (_segment_shard(s, root, segment, max_per_image, min_area) for s in shards)
        bar = tqdm(total=len(records), desc=f"cells (segment, {segment.device})", unit="img", disable=not progress)
        for s, part in zip(shards, parts):
            rows.extend(part)
            bar.update(len(s))
        bar.close()
    columns = COLUMNS + (["fold"] if "fold" in index.columns else [])
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(root / "cells.csv", index=False)
    logger.info("%d cells from %d images -> %s", len(table), len(index), root / "cells.csv")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.cells", description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, type=Path, help="index.csv written by hpa_kernel.train.prepare")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--truth", type=Path, help="synthetic truth folder (labels/<ID>.png + cells.csv): evaluation only")
    src.add_argument("--segment", action="store_true", help="segment with the kernel's segmenter; image labels")
    ap.add_argument("--nuclei", type=str, help="hpacellseg nuclei U-Net (with --cell; default: classic)")
    ap.add_argument("--cell", type=str, help="hpacellseg cell U-Net")
    ap.add_argument("--device", default="auto", help="auto (GPU when usable), cpu, cuda, cuda:N")
    ap.add_argument("--fp16", action="store_true", help="fp16 autocast for the U-Nets (CUDA only)")
    ap.add_argument("--workers", type=int, default=1, help="segmentation processes")
    ap.add_argument("--batch-size", type=int, default=8, help="images per segmentation batch")
    ap.add_argument("--max-per-image", type=int, default=12)
    ap.add_argument("--min-area", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.index.is_file():
        logger.error("--index %s: file not found", args.index)
        return 2
    if (args.nuclei is None) != (args.cell is None):
        logger.error("--nuclei and --cell go together")
        return 2
    opts = None
    if args.segment:
        from hpa_kernel.run.device import DeviceError, resolve_device

        try:
            device, _ = resolve_device(args.device)
        except DeviceError as e:
            logger.error("%s", e)
            return 2
        opts = SegmentOptions(args.nuclei, args.cell, device, max(1, args.workers), max(1, args.batch_size),
                              args.fp16)
    try:
        table = build_cell_table(args.index, args.truth, opts, args.max_per_image, args.min_area)
    except (ValueError, OSError) as e:  # a bad truth folder, an unreadable index: one line, no traceback
        logger.error("%s", e)
        return 2
    print(f"{len(table)} cells -> {args.index.parent / 'cells.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
