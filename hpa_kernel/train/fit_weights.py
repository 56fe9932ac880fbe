"""Fit the ensemble's Step 1 / Step 2 weights on a validation fold's out-of-fold table.

    python -m hpa_kernel.train.fit_weights --oof OOF.csv --manifest weights/manifest.json \\
        [--truth DIR | --objective images|single-label-cells] [--out OUT.json] [--per-class] [--grid 21] [--size 512]

``OOF.csv`` is the per-cell table of :mod:`hpa_kernel.train.oof` (``ID, cell_id, y0, x0,
y1, x1`` in the ``--size`` px image, ``width, height`` = original size, ``Label``,
``step1_0..18``, ``step2_0..18``); run it with the ``--cam`` the manifest's ``step1.cam``
names, so Step 1's columns are what the kernel will compute. The weights are fitted on
the validation fold, so the numbers to report are those of held-out images
(``bench/quality.py``), never the fitted mAP printed here.

What counts as right:

* ``--truth DIR`` (a truth folder in :mod:`hpa_kernel.tools.metric`'s layout,
  ``labels/<ID>.png`` + ``cells.csv``; on synthetic data the training set's ``truth/``):
  per-cell truth. Every OOF cell is matched to its highest-IoU truth cell of each class
  by **box** IoU at the original size (the OOF table holds boxes, not masks), and scored
  exactly as the metric scores (a test checks it against :func:`~hpa_kernel.tools.metric.evaluate_arrays`).
* without ``--truth`` (real training data has image labels only): an image-label
  objective, ``--objective``. ``images`` (default): per class, every image ranked by its
  best cell's ensembled score, one AP against the image labels (is the class in the
  image?). ``single-label-cells``: the cells of images with exactly one label, ranked per
  class, that label as their truth. Both are scored with the metric's own AP
  (:func:`hpa_kernel.tools.metric.average_precision`). What they are worth, measured on a
  synthetic validation fold against its per-cell truth (``bench/fit_objective.py``,
  BENCHMARKS.md): ``images`` follows the truth over the grid (Spearman 0.77) but its
  pair fit did not beat 0.5/0.5 out of half (-0.001) and its per-class fit lost 0.017;
  ``single-label-cells`` could not be measured there (1 of 47 images has one label).
  (Counting every cell as showing its image's labels, as before, scores 1.0 at every
  weight: it ranks nothing.)

A table that cannot be fitted is refused with its reason (exit 2, the manifest
untouched): no cells, NaN/infinite/empty scores, fewer than two classes with positives
and negatives, ``--size`` not the frame of the boxes (a box past it, or none reaching
3/4 of it). When the objective is the same at every grid point (flat) nothing is fitted:
a warning, and the manifest stays as it is.

The search: ranking within a class ignores a common scale, so only ``w1 / (w1 + w2)``
matters; ``w1`` runs over ``--grid`` points of [0, 1] and ``w2 = 1 - w1``. ``--per-class``
picks ``w1`` per class (each class's AP depends on its own weight only, so this maximises
the mAP); classes without truth in the table get the best common ``w1``. Ties go to the
``w1`` nearest 0.5. The kernel's ``top_classes`` cut (18 of 19) is not applied.

The output (default: the manifest itself, replaced atomically through
:func:`hpa_kernel.formats.atomic.atomic_write`: a kill leaves the old file) is the manifest with ``step_weights``
= ``{"step1": w1, "step2": w2}`` or ``{"step1": [19 numbers], "step2": [19 numbers]}``,
checked by :func:`hpa_kernel.config.config_from_dict`; ``<out stem>.fit.json`` beside it
records what was fitted on what.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES, parse_labels
from hpa_kernel.train.oof import STEP1_COLS, STEP2_COLS, read_table

__all__ = ["OBJECTIVES", "MatchTable", "WeakTable", "match_oof", "class_ap", "fit_step_weights", "main"]

logger = logging.getLogger(__name__)
BOX_COLS = ["y0", "x0", "y1", "x1"]
NEEDED = ["ID", "cell_id", *BOX_COLS, "width", "height", "Label", *STEP1_COLS, *STEP2_COLS]
#: what the fit scores without per-cell truth (see the module docstring; BENCHMARKS.md measures them)
OBJECTIVES = ("images", "single-label-cells")
DEFAULT_OBJECTIVE = "images"


@dataclass
class MatchTable:
    """What the metric needs from an OOF table, computed once for every weight.

    ``s1``/``s2`` ``(n, 19)`` scores of the OOF cells (rows in metric order: images in sorted
    ID order, cells in table order); ``present (n, 19)`` whether the class is among the
    cell's image's truth labels (else the detection is dropped); ``gt_key (n, 19)`` a
    data-set-wide id of the cell's best truth cell of that class (-1: none with
    IoU >= threshold); ``n_gt (19,)`` truth (cell, class) entries.
    """

    s1: np.ndarray
    s2: np.ndarray
    present: np.ndarray
    gt_key: np.ndarray
    n_gt: np.ndarray

    def classes(self) -> np.ndarray:
        """The classes scored: those with truth."""
        return np.flatnonzero(self.n_gt > 0)

    def class_aps(self, w1: float | np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Local box AP of ``classes`` at Step 1 weight ``w1`` (a number or one per class)."""
        w = np.broadcast_to(np.asarray(w1, np.float64), (NUM_CLASSES,))
        return np.array([class_ap(w[c] * self.s1[:, c] + (1 - w[c]) * self.s2[:, c], self.present[:, c],
                                  self.gt_key[:, c], self.n_gt[c]) for c in classes])


@dataclass
class WeakTable:
    """Image labels only: items ranked per class against weak truth, one AP per class with
    :func:`hpa_kernel.tools.metric.average_precision` (the metric's AP).

    ``objective`` ``"images"``: the items are the images, each scored by its best cell's
    ensembled score, truth = the image's labels. ``"single-label-cells"``: the items are
    the cells of images with exactly one label, truth = that label. ``s1``/``s2`` the
    cells' scores in metric order; ``starts`` where each image's cells begin (images);
    ``truth (items, 19)``; ``n_gt (19,)`` positives per class.
    """

    objective: str
    s1: np.ndarray
    s2: np.ndarray
    starts: np.ndarray | None
    truth: np.ndarray
    n_gt: np.ndarray

    def classes(self) -> np.ndarray:
        """The classes scored: those with positives and negatives (others score 1 or 0 at any weight)."""
        return np.flatnonzero((self.n_gt > 0) & (self.n_gt < len(self.truth)))

    def class_aps(self, w1: float | np.ndarray, classes: np.ndarray) -> np.ndarray:
        from hpa_kernel.tools.metric import average_precision

        w = np.asarray(w1, np.float64)
        ens = w * self.s1 + (1 - w) * self.s2  # a per-class w broadcasts over the columns
        if self.starts is not None:
            ens = np.maximum.reduceat(ens, self.starts, axis=0)  # each image's best cell
        return np.array([average_precision(ens[:, c], self.truth[:, c], int(self.n_gt[c])) for c in classes])


def _weak_table(table: pd.DataFrame, objective: str) -> WeakTable:
    """The image-label objective ``objective`` of a table in metric order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    labels = table["Label"].astype(str).to_numpy()
    if objective == "single-label-cells":
        keep = np.array([len(parse_labels(lab)) == 1 for lab in labels])
        if not keep.any():
            raise ValueError("no image of the OOF table has exactly one label (the single-label-cells objective)")
        table, labels, starts = table[keep].reset_index(drop=True), labels[keep], None
    else:
        ids = table["ID"].astype(str).to_numpy()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        labels = labels[starts]
    truth = np.zeros((len(labels), NUM_CLASSES), bool)
    for i, lab in enumerate(labels):
        truth[i, parse_labels(lab)] = True
    s1, s2 = _scores(table)
    return WeakTable(objective=objective, s1=s1, s2=s2, starts=starts, truth=truth, n_gt=truth.sum(axis=0))


def _metric_order(table: pd.DataFrame) -> pd.DataFrame:
    order = np.argsort(table["ID"].astype(str).to_numpy(), kind="stable")  # the metric's image order
    return table.iloc[order].reset_index(drop=True)


def _scores(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return table[STEP1_COLS].to_numpy(np.float64), table[STEP2_COLS].to_numpy(np.float64)


def match_oof(
    table: pd.DataFrame, truth_dir: str | Path | None = None, size: int = 512, iou_threshold: float = 0.6,
    objective: str = DEFAULT_OBJECTIVE,
) -> "MatchTable | WeakTable":
    """What the fit scores (see the module docstring).

    ``truth_dir``: per-cell truth, matched by box IoU at the original size (``size`` is
    the side of the square image the OOF boxes are in, checked against the boxes;
    ``width``/``height`` give each image's original size; images without truth are
    dropped). ``None``: the image labels, through ``objective`` (:data:`OBJECTIVES`).
    Refuses (``ValueError``, one line) a table without rows, with non-finite scores, or
    where fewer than two classes have truth.
    """
    missing = [c for c in NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"OOF table lacks column(s) {', '.join(missing)}")
    _check_scores(table)
    if truth_dir is None:
        m = _weak_table(_metric_order(table), objective)
    else:
        _check_size(table, size)
        m = _match_truth(table, truth_dir, size, iou_threshold)
    _check_classes(m)
    return m


def _check_scores(table: pd.DataFrame) -> None:
    if table.empty:
        raise ValueError("the OOF table has no cells")
    scores = table[STEP1_COLS + STEP2_COLS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(scores).all(axis=1)  # NaN, infinite, empty or not a number
    if bad.all():
        raise ValueError(f"the OOF table's Step 1 / Step 2 scores are all NaN or infinite ({len(table)} cells): "
                         "nothing to fit on")
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(table)} OOF cells have NaN or infinite Step 1 / Step 2 scores "
                         f"(first: image {table['ID'].iloc[int(np.flatnonzero(bad)[0])]}): rerun train.oof")


def _check_size(table: pd.DataFrame, size: int) -> None:
    """``--size`` is the side the OOF boxes are in: no box may pass it, and the boxes
    (cells reach the image border) must reach at least 3/4 of it."""
    reach = float(table[["y1", "x1"]].to_numpy(np.float64).max())
    if reach > size:
        raise ValueError(f"--size {size}: the OOF table's boxes reach {reach:g} px; give the --size train.oof ran with")
    if reach < 0.75 * size:
        raise ValueError(f"--size {size}: the OOF table's boxes reach only {reach:g} px; "
                         "give the --size train.oof ran with (its boxes are in that frame)")


def _check_classes(m: "MatchTable | WeakTable") -> None:
    if len(m.classes()) < 2:
        found = ", ".join(f"{c} ({CLASS_NAMES[c]})" for c in np.flatnonzero(m.n_gt > 0)) or "none"
        raise ValueError(f"the OOF table has truth for class(es) {found} only"
                         f"{' (or every item has it)' if len(found.split(',')) >= 2 else ''}: "
                         "fitting 19 classes' weights needs at least two classes with positives and negatives")


def _match_truth(table: pd.DataFrame, truth_dir: str | Path, size: int, iou_threshold: float) -> "MatchTable":
    from hpa_kernel.stages.labels import label_boxes
    from hpa_kernel.formats.truth import read_label_image, read_truth_index
    from hpa_kernel.tools.metric import box_iou

    truth = read_truth_index(truth_dir)
    table = table[table["ID"].astype(str).isin(set(truth))]
    if table.empty:
        raise ValueError(f"no image of the OOF table has truth in {truth_dir}")
    table = _metric_order(table)
    n = len(table)
    present = np.zeros((n, NUM_CLASSES), bool)
    gt_key = np.full((n, NUM_CLASSES), -1, np.int64)
    n_gt = np.zeros(NUM_CLASSES, np.int64)
    key0 = 0
    for image_id, rows in table.groupby("ID", sort=False).indices.items():
        cells = truth[str(image_id)]
        ids = np.asarray(sorted(cells), np.int64)
        has = np.zeros((len(ids), NUM_CLASSES), bool)
        for j, cid in enumerate(ids):
            has[j, list(cells[cid])] = True
        n_gt += has.sum(axis=0)
        w, h = float(table.at[rows[0], "width"]), float(table.at[rows[0], "height"])
        if w <= 0 or h <= 0:
            raise ValueError(f"{image_id}: the OOF table has no original width/height (needed to match boxes)")
        labels = read_label_image(truth_dir, str(image_id))
        if labels.shape != (int(h), int(w)):
            raise ValueError(f"{image_id}: truth labels are {labels.shape[::-1]}, the OOF table says {int(w)}x{int(h)}")
        boxes = np.rint(table.loc[rows, BOX_COLS].to_numpy(np.float64) * np.array([h, w, h, w]) / float(size))
        iou = box_iou(boxes, label_boxes(labels, ids))  # (cells, truth cells)
        present[rows] = has.any(axis=0)[None, :]
        for c in np.flatnonzero(has.any(axis=0)):
            cand = np.flatnonzero(has[:, c])
            best = cand[iou[:, cand].argmax(axis=1)]  # ties: the lowest truth id
            ok = iou[np.arange(len(rows)), best] >= iou_threshold
            gt_key[rows, c] = np.where(ok, key0 + best, -1)
        key0 += len(ids)
    s1, s2 = _scores(table)
    return MatchTable(s1=s1, s2=s2, present=present, gt_key=gt_key, n_gt=n_gt)


def class_ap(conf: np.ndarray, present: np.ndarray, gt_key: np.ndarray, n_gt: int) -> float:
    """AP of one class exactly as :mod:`hpa_kernel.tools.metric` scores it (rows in metric order):
    its matching rule (``take_cells``; the pooled confidence order keeps each image's order)
    and its AP."""
    from hpa_kernel.tools.metric import average_precision, take_cells

    keep = present & (conf > 0)
    conf, key = conf[keep], gt_key[keep]
    order = np.argsort(-conf, kind="stable")
    return average_precision(conf[order], take_cells(key[order]), int(n_gt))


def fit_step_weights(m: "MatchTable | WeakTable", grid: int = 21, per_class: bool = False) -> dict:
    """Grid search of ``w1`` in [0, 1] (``w2 = 1 - w1``) maximising the mean AP of ``m``'s classes.

    Returns ``{"step1": float | list, "step2": ..., "mAP": fitted, "mAP_default": at 0.5,
    "ap": (grid, classes) table, "grid": values, "classes": scored classes, "flat": no
    class's AP changes over the grid (nothing to fit)}``. A class whose AP is flat gets
    0.5 (ties go to the ``w1`` nearest 0.5).
    """
    w = np.round(np.linspace(0.0, 1.0, int(grid)), 6)  # 0.3, not 0.30000000000000004, in the manifest
    w2 = np.round(1.0 - w, 6)  # Step 2's weight at each grid point, rounded the same way
    classes = m.classes()
    if len(classes) == 0:
        raise ValueError("no class has truth in the matched table")
    ap = np.stack([m.class_aps(x, classes) for x in w])  # (grid, classes)
    pref = -np.abs(w - 0.5)  # ties: nearest 0.5

    def best(score: np.ndarray) -> int:
        return int(np.lexsort((pref, np.round(score, 12)))[-1])

    common = best(ap.mean(axis=1))
    flat = bool(np.ptp(np.round(ap, 12), axis=0).max() == 0)
    out = {"grid": w.tolist(), "classes": classes.tolist(), "ap": ap, "flat": flat,
           "mAP_default": float(m.class_aps(0.5, classes).mean())}
    if per_class:
        picks = [best(ap[:, j]) for j in range(len(classes))]
        at = np.full(NUM_CLASSES, common)  # grid index per class; classes without truth: the common pick
        at[classes] = picks
        out.update(step1=w[at].tolist(), step2=w2[at].tolist(),
                   mAP=float(np.mean([ap[p, j] for j, p in enumerate(picks)])))
    else:
        out.update(step1=float(w[common]), step2=float(w2[common]), mAP=float(ap[common].mean()))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.fit_weights", description=__doc__.splitlines()[0])
    ap.add_argument("--oof", required=True, type=Path, help="OOF table of the validation fold (.csv/.parquet)")
    ap.add_argument("--manifest", required=True, type=Path, help="the manifest to give the weights")
    ap.add_argument("--out", type=Path, help="manifest to write (default: --manifest itself, replaced atomically)")
    ap.add_argument("--truth", type=Path,
                    help="per-cell truth folder (labels/ + cells.csv); default: the image labels (--objective)")
    ap.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                    help=f"without --truth: what is ranked against the image labels (default {DEFAULT_OBJECTIVE}: "
                         "per class, the images by their best cell's ensembled score)")
    ap.add_argument("--per-class", action="store_true", help="one weight pair per class (19-vectors)")
    ap.add_argument("--grid", type=int, default=21, help="points of w1 in [0, 1] (default 21: steps of 0.05)")
    ap.add_argument("--size", type=int, default=512,
                    help="side of the image the OOF boxes are in: train.oof's --size (default 512; checked)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.grid < 2:
        ap.error("--grid needs at least 2 points")
    from hpa_kernel.config import ConfigError, config_from_dict

    out = args.out or args.manifest
    try:
        manifest = json.loads(args.manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.error("manifest %s: %s", args.manifest, e)
        return 2
    what = f"local box mAP against {args.truth}" if args.truth else f"image-label mAP, objective {args.objective}"
    try:
        table = read_table(args.oof)
        logger.info("grid %d, per_class %s, size %d, %s", args.grid, args.per_class, args.size, what)
        if args.per_class and not args.truth:
            logger.warning("--per-class from image labels: on the synthetic validation fold it lost 0.017 "
                           "per-cell mAP out of half against 0.5/0.5 (BENCHMARKS.md); the pair lost 0.001")
        m = match_oof(table, args.truth, size=args.size, objective=args.objective)
        fit = fit_step_weights(m, grid=args.grid, per_class=args.per_class)
        if fit["flat"]:
            logger.warning("the objective is flat: every w1 of the grid scores %.4f (%s); nothing fitted, %s "
                           "left as it is", fit["mAP_default"], what, out)
            print(f"nothing fitted: the objective is flat ({fit['mAP_default']:.4f} at every weight); {out} unchanged")
            return 0
        manifest["step_weights"] = {"step1": fit["step1"], "step2": fit["step2"]}
        config_from_dict(manifest, root=out.parent, allow_outside=True)
        _write(out, manifest, fit, args, table, what)
    except (OSError, ValueError, ConfigError) as e:
        logger.error("%s", e)
        return 2
    w1 = fit["step1"] if not args.per_class else "per class " + ",".join(f"{v:.2f}" for v in fit["step1"])
    print(f"step1 weight {w1}: fitted {what.split(',')[0].split(' against')[0]} {fit['mAP']:.4f} "
          f"(0.5/0.5: {fit['mAP_default']:.4f}) "
          f"on {table['ID'].nunique()} validation images -> {out}")
    return 0


def _write(out: Path, manifest: dict, fit: dict, args: argparse.Namespace, table: pd.DataFrame, what: str) -> None:
    """The manifest and its ``.fit.json`` record, each replaced atomically (a kill leaves the old file)."""
    from hpa_kernel.config import write_manifest
    from hpa_kernel.formats.atomic import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {k: fit[k] for k in ("step1", "step2", "mAP", "mAP_default", "grid", "classes")}
    record.update(oof=str(args.oof), truth=str(args.truth) if args.truth else "image labels",
                  objective="per-cell truth, box IoU" if args.truth else args.objective,
                  manifest=str(args.manifest), iou="box", size=args.size,
                  images=int(table["ID"].nunique()), cells=len(table))
    write_manifest(out, manifest)
    atomic_write(out.with_name(f"{out.stem}.fit.json"), (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    raise SystemExit(main())
