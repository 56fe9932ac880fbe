"""Out-of-fold export: per cell, per class Step 1 and Step 2 predictions of one fold.

    python -m hpa_kernel.train.oof --config configs/demo.json --checkpoint runs/demo/best.pt \\
        --fold 0 --out oof.csv [--images-out oof.images.csv] [--cells-out oof.cells] [--device auto] \\
        [--src DIR ...] [--size 512] [--limit N] [--cam relu_max|minmax]

For every validation image of fold K (from the config's ``index_csv``) this runs what the
kernel runs: the 512 px image (from the RGBY cache, or from the original PNGs with
``--src``), segmentation (weight-free classic unless ``--nuclei/--cell`` weights are
given), the full-image forward + Step 1 (CAM ∩ cells) and Step 2 (cell crops through the
same model). One row per cell: ``ID, fold, cell_id, y0, x0, y1, x1`` (bounding box in the
``size`` image, half-open), ``width, height`` (original size, 0 if unknown), ``Label``
(the image labels), ``step1_0..step1_18``, ``step2_0..step2_18``. Written as CSV, or as
Parquet when ``--out`` ends in ``.parquet`` (needs pyarrow), for ensembling with other
teams' models.

Beside it, the per-image file (``--images-out``, default ``<out stem>.images<suffix>``):
one row per image, ``ID, fold, width, height, Label, n_cells, image_0..image_18`` (the
full-image sigmoid probabilities of the model), for image-level OOF metrics and stacking.

And the per-cell export folder (``--cells-out``, default ``<out stem>.cells`` beside
``--out``): the same folder and table that ``submit --save-cells`` writes
(:mod:`hpa_kernel.formats.cells`, the one writer: label PNGs at ``size``, boxes and areas
at the original size, the checkpoint as model ``m0`` with its ``step1``, ``step2`` and
``ens`` columns, and final ``score_cc`` columns by the kernel's default manifest rules:
step weights 0.5/0.5, top 18 classes, no floor; :class:`OOFOptions` sets them), so a team
can fit ensemble weights on OOF folders and apply them to test-time folders.
``--device auto`` (the default) runs on the GPU when one is usable.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import CAM_NORMS
from hpa_kernel.train.config import load_train_config
from hpa_kernel.train.dataset import load_index

if TYPE_CHECKING:
    from hpa_kernel.stages.model import PuzzleCAM

__all__ = ["OOFOptions", "predict_cells", "export_oof_tables", "images_path", "cells_path",
           "write_table", "read_table", "main"]

logger = logging.getLogger(__name__)
STEP1_COLS = [f"step1_{c}" for c in range(NUM_CLASSES)]
STEP2_COLS = [f"step2_{c}" for c in range(NUM_CLASSES)]
IMAGE_COLS = [f"image_{c}" for c in range(NUM_CLASSES)]


@dataclass
class OOFOptions:
    size: int = 512  # the kernel's working size (segmentation, crops)
    batch_size: int = 16  # crops per forward
    device: str = "cpu"
    fp16: bool = False
    limit: int | None = None  # first N images of the fold only
    cam_norm: str = "relu_max"  # Step 1's CAM normalisation, as the manifest's step1.cam
    # the per-cell export's ens / final scores, as the kernel's manifest defaults
    step1_weight: float = 0.5
    step2_weight: float = 0.5
    top_classes: int = 18
    min_confidence: float = 0.0


def predict_cells(model, meta: dict[str, Any], image: np.ndarray, labels: np.ndarray, opts: OOFOptions,
                  forward: tuple[np.ndarray, np.ndarray] | None = None):
    """``(cell_ids, boxes (n,4), step1 (n,19), step2 (n,19))`` for one image and its cell labels.

    ``forward``: the image's ``(probs, cams)`` from :func:`hpa_kernel.stages.model.classify_image`
    when already computed.
    """
    from hpa_kernel.stages.labels import present_ids
    from hpa_kernel.stages.step1 import step1_scores
    from hpa_kernel.stages.labels import label_boxes as cell_boxes
    from hpa_kernel.stages.step2 import crop_cells, predict_crops

    cell_ids = present_ids(labels)
    n = len(cell_ids)
    if n == 0:
        z = np.zeros((0, NUM_CLASSES), np.float32)
        return cell_ids, np.zeros((0, 4), np.int64), z, z
    from hpa_kernel.stages.model import classify_image

    probs, cams = forward if forward is not None else classify_image(
        model, image, opts.device, opts.fp16, cam_norm=opts.cam_norm)
    s1 = step1_scores(cams, probs, labels, cell_ids)
    crops = crop_cells(image, labels, cell_ids, crop_size=int(meta["crop_size"]))
    s2 = predict_crops(model, crops, mean=meta["mean"], std=meta["std"], batch_size=opts.batch_size,
                       device=opts.device, fp16=opts.fp16)
    return cell_ids, cell_boxes(labels, cell_ids), s1, s2


def _load_512(row, sources: Sequence[Path], size: int) -> np.ndarray:
    """The fold image at ``size`` as float32 [0, 1]: from the PNGs if ``sources``, else the cache."""
    if sources:
        from hpa_kernel.formats.images import read_rgby, resize_rgby
        from hpa_kernel.train.prepare import find_source

        src = find_source(str(row.ID), sources)
        if src is None:
            raise FileNotFoundError(f"{row.ID}: not in any --src folder")
        return resize_rgby(read_rgby(src, str(row.ID)), size)
    from hpa_kernel.formats.images import resize_rgby

    return resize_rgby(np.load(row.path), size)


def export_oof_tables(
    index_csv: str | Path,
    checkpoint: str | Path | PuzzleCAM,
    fold: int,
    segmenter=None,
    sources: Sequence[str | Path] = (),
    opts: OOFOptions | None = None,
    progress: bool = True,
    cells_out: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per-cell table, per-image table)`` of ``fold`` (see the module docstring); with
    ``cells_out`` also the per-cell export folder there (started afresh).

    ``checkpoint``: a :func:`~hpa_kernel.stages.model.save_checkpoint` file, or a
    :class:`~hpa_kernel.stages.model.PuzzleCAM` already loaded (it carries its meta)."""
    from hpa_kernel.formats.cells import CellsWriter
    from hpa_kernel.stages.ensemble import combine_steps, select_top_classes
    from hpa_kernel.stages.model import PuzzleCAM, classify_image, load_checkpoint

    opts = opts or OOFOptions()
    if segmenter is None:
        from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

        segmenter = Segmenter(device=opts.device)
    if isinstance(checkpoint, PuzzleCAM):
        model, meta = checkpoint, checkpoint.meta
    else:
        model, meta = load_checkpoint(checkpoint, device=opts.device)
    index = load_index(index_csv)
    if "fold" not in index.columns:
        raise ValueError(f"{index_csv} has no fold column")
    rows = index[index["fold"] == fold].reset_index(drop=True)
    if len(rows) == 0:
        raise ValueError(f"fold {fold} has no images in {index_csv}")
    if opts.limit:
        rows = rows.iloc[: opts.limit]
    sources = [Path(s) for s in sources]
    parts, image_rows = [], []
    writer = CellsWriter(cells_out, models=["m0"], resume=False) if cells_out is not None else None
    for row in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"oof fold {fold}", disable=not progress):
        image = _load_512(row, sources, opts.size)
        w, h = int(getattr(row, "width", 0) or 0), int(getattr(row, "height", 0) or 0)
        seg = segmenter.segment(image[None], [(w or opts.size, h or opts.size)])[0]
        forward = classify_image(model, image, opts.device, opts.fp16, cam_norm=opts.cam_norm)
        cell_ids, boxes, s1, s2 = predict_cells(model, meta, image, seg.cells, opts, forward)
        image_rows.append({"ID": str(row.ID), "fold": fold, "width": w, "height": h, "Label": str(row.Label),
                           "n_cells": len(cell_ids), **dict(zip(IMAGE_COLS, map(float, forward[0])))})
        part = pd.DataFrame({"ID": str(row.ID), "fold": fold, "cell_id": cell_ids.astype(int),
                             "y0": boxes[:, 0], "x0": boxes[:, 1], "y1": boxes[:, 2], "x1": boxes[:, 3],
                             "width": w, "height": h, "Label": str(row.Label)})
        parts.append(pd.concat([part, pd.DataFrame(s1, columns=STEP1_COLS), pd.DataFrame(s2, columns=STEP2_COLS)],
                               axis=1))
        if writer is not None:
            ens = combine_steps(s1, s2, opts.step1_weight, opts.step2_weight)
            final = select_top_classes(ens, top_n=opts.top_classes, floor=opts.min_confidence)
            writer.write_image(str(row.ID), seg.cells, (w or opts.size, h or opts.size), cell_ids, final,
                               {"m0": {"step1": s1, "step2": s2, "ens": ens}})
    if writer is not None:
        writer.close()
    table = pd.concat(parts, ignore_index=True)
    images = pd.DataFrame(image_rows, columns=["ID", "fold", "width", "height", "Label", "n_cells", *IMAGE_COLS])
    logger.info("fold %d: %d cells in %d images", fold, len(table), len(rows))
    return table, images


def images_path(out: str | Path) -> Path:
    """The default per-image file beside ``out``: ``oof.csv`` -> ``oof.images.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.images{out.suffix}")


def cells_path(out: str | Path) -> Path:
    """The default per-cell export folder beside ``out``: ``oof.csv`` -> ``oof.cells``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.cells")


def write_table(table: pd.DataFrame, out: str | Path) -> Path:
    """CSV, or Parquet for a ``.parquet`` path (a clear error when pyarrow is missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{out}: Parquet needs pyarrow (pip install pyarrow) or use a .csv path") from None
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False, float_format="%.6g")
    return out


def read_table(path: str | Path) -> pd.DataFrame:
    """An OOF table written by :func:`write_table` (CSV, or Parquet for ``.parquet``), ``ID`` as text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OOF table {path} not found")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        table["ID"] = table["ID"].astype(str)
        return table
    return pd.read_csv(path, dtype={"ID": str, "Label": str}, keep_default_na=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.oof", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="training config (for index_csv)")
    ap.add_argument("--index-csv", type=Path, help="index.csv (overrides the config's)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--fold", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path, help=".csv or .parquet")
    ap.add_argument("--images-out", type=Path, help="per-image file (default: <out stem>.images<suffix>)")
    ap.add_argument("--cells-out", type=Path,
                    help="per-cell export folder, the table submit --save-cells writes (default: <out stem>.cells)")
    ap.add_argument("--src", action="append", default=[], type=Path, help="read the original PNGs from here")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto (GPU when usable), cpu, cuda, cuda:N")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--cam", default="relu_max", choices=CAM_NORMS,
                    help="Step 1's CAM normalisation, as the manifest's step1.cam (default: relu_max, the reference)")
    ap.add_argument("--nuclei", type=Path, help="hpacellseg nuclei U-Net (with --cell; default: classic)")
    ap.add_argument("--cell", type=Path, help="hpacellseg cell U-Net")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.index_csv is None and args.config is None:
        ap.error("give --config or --index-csv")
    if (args.nuclei is None) != (args.cell is None):
        ap.error("--nuclei and --cell go together")
    from hpa_kernel.run.device import DeviceError
    from hpa_kernel.train.config import TrainConfigError

    try:
        return _export(args)
    except (TrainConfigError, DeviceError, ValueError, OSError, RuntimeError) as e:  # one line, no traceback
        logger.error("%s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return 2


def _export(args: argparse.Namespace) -> int:
    """The CLI's work once the arguments parse; the user's mistakes raise (``main`` reports them)."""
    from hpa_kernel.config import SegmentationConfig
    from hpa_kernel.run.device import resolve_device
    from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

    index_csv = args.index_csv or load_train_config(args.config).index_csv
    if not Path(index_csv).is_file():
        raise FileNotFoundError(f"index {index_csv}: file not found")
    seg_cfg = SegmentationConfig(method="hpa", nuclei=args.nuclei, cell=args.cell) if args.cell else SegmentationConfig()
    device, _ = resolve_device(args.device)
    opts = OOFOptions(size=args.size, batch_size=args.batch_size, device=device, fp16=args.fp16, limit=args.limit,
                      cam_norm=args.cam)
    table, images = export_oof_tables(index_csv, args.checkpoint, args.fold, Segmenter(seg_cfg, device=device),
                                      args.src, opts, cells_out=args.cells_out or cells_path(args.out))
    out = write_table(table, args.out)
    img_out = write_table(images, args.images_out or images_path(args.out))
    print(f"{len(table)} cells of {table['ID'].nunique()} images -> {out}; {len(images)} image rows -> {img_out}; "
          f"per-cell export -> {args.cells_out or cells_path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
