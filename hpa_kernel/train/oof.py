"""Out-of-fold export: the kernel's own per-cell export of one validation fold.

    python -m hpa_kernel.train.oof --config configs/demo.json --checkpoint runs/demo/best.pt \\
        --fold 0 --out oof_fold0 [--manifest weights/manifest.json] [--src DIR ...] \\
        [--limit N] [--device auto] [--fp16] [--tta] [--batch-size 16]

Every validation image of fold K (from the config's ``index_csv``; the RGBY cache, or the
original PNGs with ``--src``) goes through the kernel's
:class:`~hpa_kernel.stages.predictor.Predictor` as ``submit`` runs it: the manifest's
segmentation, ``image_size``, ``step1.cam``, ``crop_size``, ``top_classes`` and
``min_confidence``, with the fold's checkpoint as its one classifier ``m0``. ``--out`` is
written by :class:`~hpa_kernel.formats.cells.CellsWriter`, the folder ``submit
--save-cells`` writes (label PNGs at the working size, boxes and areas at the original
size, ``m0_step1``, ``m0_step2``, ``m0_ens`` and the final ``score`` columns), so
:mod:`hpa_kernel.train.fit_weights` fits on the numbers the kernel computes. Both steps
always run: a manifest that weighs one of them 0 is scored at 0.5/0.5 here (logged).

Beside the table, ``--out``/``oof_images.csv`` (:func:`read_image_table`): one row per
image, ``ID, fold, Label`` (the image labels, for fitting without per-cell truth) and
``image_0..image_18`` (the model's full-image probabilities, for image-level metrics and
stacking). ``--device auto`` (the default) runs on the GPU when one is usable.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import KernelConfig, load_config
from hpa_kernel.train.config import load_train_config
from hpa_kernel.train.dataset import load_index

__all__ = ["IMAGE_COLS", "IMAGES_NAME", "OOFOptions", "oof_predictor", "export_oof", "write_image_table",
           "read_image_table", "main"]

logger = logging.getLogger(__name__)
IMAGE_COLS = [f"image_{c}" for c in range(NUM_CLASSES)]
#: the per-image table inside the export folder (the export's own ``images.csv`` is its index)
IMAGES_NAME = "oof_images.csv"


@dataclass
class OOFOptions:
    """How the fold is run (the scoring rules come from the manifest)."""

    device: str = "cpu"
    fp16: bool = False
    tta: bool = False
    batch_size: int | None = None  # Step 2 crops per forward (None: the manifest's)
    limit: int | None = None  # first N images of the fold only


def oof_predictor(model, config: KernelConfig, opts: OOFOptions):
    """The kernel's :class:`~hpa_kernel.stages.predictor.Predictor` of ``config`` with ``model``
    as its one classifier ``m0`` (Step 1 and Step 2 both weighed, see the module docstring)."""
    from hpa_kernel.stages.predictor import Member, Predictor, crop_size_of
    from hpa_kernel.stages.segmentation import create_segmenter

    if not (config.use_step1 and config.use_step2):
        logger.info("the manifest weighs one step 0; the OOF export runs both, at 0.5/0.5")
        config = config.replace(step1_weight=0.5, step2_weight=0.5)
    segmenter = create_segmenter(config.segmentation, device=opts.device, fp16=opts.fp16)
    member = Member(model, 1.0, crop_size=crop_size_of(model, config)[0], name="m0")
    return Predictor(segmenter, [member], config.replace(classifiers=[]), opts.device, opts.fp16, opts.tta,
                     opts.batch_size)


def _read_image(row, sources: Sequence[Path]) -> tuple[np.ndarray, tuple[int, int]]:
    """The fold image's raw RGBY (the PNGs if ``sources``, else the cache) and its original
    ``(width, height)`` (the index's, else the image's own)."""
    if sources:
        from hpa_kernel.formats.images import read_rgby
        from hpa_kernel.train.prepare import find_source

        src = find_source(str(row.ID), sources)
        if src is None:
            raise FileNotFoundError(f"{row.ID}: not in any --src folder")
        rgby = read_rgby(src, str(row.ID))
    else:
        rgby = np.load(row.path)
    w, h = int(getattr(row, "width", 0) or 0), int(getattr(row, "height", 0) or 0)
    return rgby, (w, h) if w > 0 and h > 0 else (rgby.shape[1], rgby.shape[0])


def _fold_rows(index_csv: str | Path, fold: int, limit: int | None) -> pd.DataFrame:
    index = load_index(index_csv)
    if "fold" not in index.columns:
        raise ValueError(f"{index_csv} has no fold column")
    rows = index[index["fold"] == fold].reset_index(drop=True)
    if len(rows) == 0:
        raise ValueError(f"fold {fold} has no images in {index_csv}")
    return rows.iloc[:limit] if limit else rows


def export_oof(
    index_csv: str | Path,
    checkpoint,
    fold: int,
    out: str | Path,
    config: KernelConfig | None = None,
    sources: Sequence[str | Path] = (),
    opts: OOFOptions | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Write fold ``fold``'s export to ``out`` (started afresh; see the module docstring) and
    return its per-image table.

    ``checkpoint``: a kernel checkpoint file, or a classifier already loaded (a
    :class:`~hpa_kernel.stages.model.ClassMapModel`; it carries its meta). ``config``: the
    manifest's rules (default: :class:`~hpa_kernel.config.KernelConfig`'s)."""
    from hpa_kernel.formats.cells import CellsWriter
    from hpa_kernel.stages.inputs import ImageInput
    from hpa_kernel.stages.model import ClassMapModel, load_checkpoint
    from hpa_kernel.stages.predictor import ScoreDetail

    opts, config = opts or OOFOptions(), config or KernelConfig()
    model = checkpoint if isinstance(checkpoint, ClassMapModel) else load_checkpoint(checkpoint, device=opts.device)[0]
    rows = _fold_rows(index_csv, fold, opts.limit)
    predictor = oof_predictor(model, config, opts)
    sources, image_rows = [Path(s) for s in sources], []
    with CellsWriter(out, models=["m0"], resume=False) as writer:
        for row in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"oof fold {fold}", disable=not progress):
            rgby, size = _read_image(row, sources)
            detail = ScoreDetail()
            labels, cell_ids, final = predictor.predict(ImageInput(rgby, config.image_size), size, detail=detail)
            writer.write_image(str(row.ID), labels, size, cell_ids, final, detail.steps)
            probs = detail.image_probs.get("m0", np.full(NUM_CLASSES, np.nan))
            image_rows.append([str(row.ID), fold, str(row.Label), *map(float, probs)])
    images = pd.DataFrame(image_rows, columns=["ID", "fold", "Label", *IMAGE_COLS])
    write_image_table(out, images)
    logger.info("fold %d: %d images -> %s", fold, len(images), out)
    return images


def write_image_table(folder: str | Path, images: pd.DataFrame) -> Path:
    """Write ``folder``/``oof_images.csv`` (atomically): ``ID, fold, Label, image_0..18``."""
    from hpa_kernel.formats.atomic import atomic_write

    path = Path(folder) / IMAGES_NAME
    atomic_write(path, images.to_csv(index=False, float_format="%.9g").encode())
    return path


def read_image_table(folder: str | Path) -> pd.DataFrame:
    """``folder``/``oof_images.csv`` of :func:`export_oof` (``ID`` and ``Label`` as text)."""
    path = Path(folder) / IMAGES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the image labels of an OOF export (python -m hpa_kernel.train.oof)")
    return pd.read_csv(path, dtype={"ID": str, "Label": str}, keep_default_na=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.oof", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, help="training config (for index_csv)")
    ap.add_argument("--index-csv", type=Path, help="index.csv (overrides the config's)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--fold", required=True, type=int)
    ap.add_argument("--out", required=True, type=Path, help="the export folder (started afresh)")
    ap.add_argument("--manifest", type=Path,
                    help="the manifest whose rules score the fold (segmentation, image_size, step1.cam, crop_size, "
                         "top_classes, min_confidence; its classifiers are not used); default: the defaults")
    ap.add_argument("--src", action="append", default=[], type=Path, help="read the original PNGs from here")
    ap.add_argument("--batch-size", type=int, help="Step 2 crops per forward (default: the manifest's)")
    ap.add_argument("--device", default="auto", help="auto (GPU when usable), cpu, cuda, cuda:N")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation, as submit --tta")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.index_csv is None and args.config is None:
        ap.error("give --config or --index-csv")
    from hpa_kernel.config import ConfigError
    from hpa_kernel.run.device import DeviceError
    from hpa_kernel.train.config import TrainConfigError

    try:
        return _export(args)
    except (TrainConfigError, ConfigError, DeviceError, ValueError, OSError, RuntimeError) as e:  # one line
        logger.error("%s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return 2


def _export(args: argparse.Namespace) -> int:
    """The CLI's work once the arguments parse; the user's mistakes raise (``main`` reports them)."""
    from hpa_kernel.run.device import resolve_device

    index_csv = args.index_csv or load_train_config(args.config).index_csv
    if not Path(index_csv).is_file():
        raise FileNotFoundError(f"index {index_csv}: file not found")
    config = load_config(args.manifest, allow_outside=True) if args.manifest else KernelConfig()
    device, _ = resolve_device(args.device)
    opts = OOFOptions(device=device, fp16=args.fp16, tta=args.tta, batch_size=args.batch_size, limit=args.limit)
    images = export_oof(index_csv, args.checkpoint, args.fold, args.out, config, args.src, opts)
    print(f"{int(images.shape[0])} images of fold {args.fold} -> {args.out} (per-cell export + {IMAGES_NAME})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
