"""Fit the ensemble's Step 1 / Step 2 weights on a validation fold's out-of-fold table.

    python -m hpa_kernel.train.fit_weights --oof OOF.csv --manifest weights/manifest.json \\
        [--truth DIR] [--out OUT.json] [--per-class] [--grid 21] [--size 512]

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
* without ``--truth`` (real training data has image labels only): each cell is taken
  to show its image's labels (``Label``), the weak labels the method trains with. The
  fitted weights then favour whichever step ranks the *images* right, which is not the
  per-cell task; say so when you report them.

The search: ranking within a class ignores a common scale, so only ``w1 / (w1 + w2)``
matters; ``w1`` runs over ``--grid`` points of [0, 1] and ``w2 = 1 - w1``. ``--per-class``
picks ``w1`` per class (each class's AP depends on its own weight only, so this maximises
the mAP); classes without truth in the table get the best common ``w1``. Ties go to the
``w1`` nearest 0.5. The kernel's ``top_classes`` cut (18 of 19) is not applied.

The output (default: the manifest itself, rewritten) is the manifest with ``step_weights``
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

from hpa_kernel.classes import NUM_CLASSES, parse_labels
from hpa_kernel.train.oof import STEP1_COLS, STEP2_COLS, read_table

__all__ = ["MatchTable", "match_oof", "class_ap", "fit_step_weights", "main"]

logger = logging.getLogger(__name__)
BOX_COLS = ["y0", "x0", "y1", "x1"]
NEEDED = ["ID", "cell_id", *BOX_COLS, "width", "height", "Label", *STEP1_COLS, *STEP2_COLS]


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


def _metric_order(table: pd.DataFrame) -> pd.DataFrame:
    order = np.argsort(table["ID"].astype(str).to_numpy(), kind="stable")  # the metric's image order
    return table.iloc[order].reset_index(drop=True)


def _scores(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return table[STEP1_COLS].to_numpy(np.float64), table[STEP2_COLS].to_numpy(np.float64)


def match_oof(
    table: pd.DataFrame, truth_dir: str | Path | None = None, size: int = 512, iou_threshold: float = 0.6
) -> MatchTable:
    """Match every OOF cell to the truth cells of its image (see the module docstring).

    ``truth_dir``: per-cell truth, matched by box IoU at the original size (``size`` is
    the side of the square image the OOF boxes are in; ``width``/``height`` give each
    image's original size; images without truth are dropped). ``None``: every cell is
    its own truth cell for each of its image's labels.
    """
    missing = [c for c in NEEDED if c not in table.columns]
    if missing:
        raise ValueError(f"OOF table lacks column(s) {', '.join(missing)}")
    if truth_dir is None:
        return _match_image_labels(_metric_order(table))
    from hpa_kernel.stages.labels import label_boxes
    from hpa_kernel.tools.metric import box_iou, read_label_image, read_truth_index

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


def _match_image_labels(table: pd.DataFrame) -> MatchTable:
    n = len(table)
    present = np.zeros((n, NUM_CLASSES), bool)
    for i, label in enumerate(table["Label"].astype(str)):
        present[i, parse_labels(label)] = True
    gt_key = np.where(present, np.arange(n)[:, None], -1)
    s1, s2 = _scores(table)
    return MatchTable(s1=s1, s2=s2, present=present, gt_key=gt_key, n_gt=present.sum(axis=0))


def class_ap(conf: np.ndarray, present: np.ndarray, gt_key: np.ndarray, n_gt: int) -> float:
    """AP of one class exactly as :mod:`hpa_kernel.tools.metric` scores it (rows in metric order)."""
    from hpa_kernel.tools.metric import average_precision

    keep = present & (conf > 0)
    conf, key = conf[keep], gt_key[keep]
    order = np.argsort(-conf, kind="stable")
    conf, key = conf[order], key[order]
    tp = np.zeros(len(conf), bool)
    eligible = np.flatnonzero(key >= 0)
    _, first = np.unique(key[eligible], return_index=True)  # the first detection takes the cell
    tp[eligible[first]] = True
    return average_precision(conf, tp, int(n_gt))


def fit_step_weights(m: MatchTable, grid: int = 21, per_class: bool = False) -> dict:
    """Grid search of ``w1`` in [0, 1] (``w2 = 1 - w1``) maximising the local mAP.

    Returns ``{"step1": float | list, "step2": ..., "mAP": fitted, "mAP_default": at 0.5,
    "ap": (grid, classes) table, "grid": values, "classes": scored classes}``.
    """
    w = np.round(np.linspace(0.0, 1.0, int(grid)), 6)  # 0.3, not 0.30000000000000004, in the manifest
    w2 = np.round(1.0 - w, 6)  # Step 2's weight at each grid point, rounded the same way
    classes = np.flatnonzero(m.n_gt > 0)
    if len(classes) == 0:
        raise ValueError("no class has truth in the matched table")

    def aps(x: float) -> np.ndarray:
        return np.array([class_ap(x * m.s1[:, c] + (1 - x) * m.s2[:, c], m.present[:, c], m.gt_key[:, c], m.n_gt[c])
                         for c in classes])

    ap = np.stack([aps(x) for x in w])  # (grid, classes)
    pref = -np.abs(w - 0.5)  # ties: nearest 0.5

    def best(score: np.ndarray) -> int:
        return int(np.lexsort((pref, np.round(score, 12)))[-1])

    common = best(ap.mean(axis=1))
    out = {"grid": w.tolist(), "classes": classes.tolist(), "ap": ap, "mAP_default": float(aps(0.5).mean())}
    if per_class:
        picks = [best(ap[:, j]) for j in range(len(classes))]
        at = np.full(NUM_CLASSES, common)  # grid index per class; classes without truth: the common pick
        at[classes] = picks
        out.update(step1=w[at].tolist(), step2=w2[at].tolist(),
                   mAP=float(np.mean([ap[p, j] for j, p in enumerate(picks)])))
    else:
        out.update(step1=float(w[common]), step2=float(w2[common]), mAP=float(ap[common].mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.fit_weights", description=__doc__.splitlines()[0])
    ap.add_argument("--oof", required=True, type=Path, help="OOF table of the validation fold (.csv/.parquet)")
    ap.add_argument("--manifest", required=True, type=Path, help="the manifest to give the weights")
    ap.add_argument("--out", type=Path, help="manifest to write (default: --manifest itself)")
    ap.add_argument("--truth", type=Path,
                    help="per-cell truth folder (labels/ + cells.csv); default: the image labels as weak cell labels")
    ap.add_argument("--per-class", action="store_true", help="one weight pair per class (19-vectors)")
    ap.add_argument("--grid", type=int, default=21, help="points of w1 in [0, 1] (default 21: steps of 0.05)")
    ap.add_argument("--size", type=int, default=512, help="side of the image the OOF boxes are in (default 512)")
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
    try:
        table = read_table(args.oof)
        logger.info("grid %d, per_class %s, size %d, truth %s", args.grid, args.per_class, args.size,
                    args.truth or "image labels (weak)")
        fit = fit_step_weights(match_oof(table, args.truth, size=args.size), grid=args.grid, per_class=args.per_class)
        manifest["step_weights"] = {"step1": fit["step1"], "step2": fit["step2"]}
        config_from_dict(manifest, root=out.parent, allow_outside=True)
    except (OSError, ValueError, ConfigError) as e:
        logger.error("%s", e)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    record = {k: fit[k] for k in ("step1", "step2", "mAP", "mAP_default", "grid", "classes")}
    record.update(oof=str(args.oof), truth=str(args.truth) if args.truth else "image labels",
                  manifest=str(args.manifest), iou="box", size=args.size,
                  images=int(table["ID"].nunique()), cells=len(table))
    out.with_name(f"{out.stem}.fit.json").write_text(json.dumps(record, indent=1) + "\n")
    w1 = fit["step1"] if not args.per_class else "per class " + ",".join(f"{v:.2f}" for v in fit["step1"])
    print(f"step1 weight {w1}: fitted local box mAP {fit['mAP']:.4f} (0.5/0.5: {fit['mAP_default']:.4f}) "
          f"on {table['ID'].nunique()} validation images -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
