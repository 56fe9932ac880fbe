"""Fit the ensemble's Step 1 / Step 2 weights on out-of-fold per-cell exports.

    python -m hpa_kernel.train.fit_weights --oof DIR [DIR ...] --manifest weights/manifest.json \\
        [--truth DIR | --objective images|single-label-cells] [--out OUT.json] [--per-class] [--grid 21]

``DIR``: per-cell exports (:mod:`hpa_kernel.formats.cells`) of validation images: what
:mod:`hpa_kernel.train.oof` writes (run it with the manifest, so Step 1's ``cam`` is the
kernel's), or ``submit --save-cells`` of a set with per-cell truth. Every weight is scored
on the kernel's own numbers by the kernel's own rules, the functions the
:class:`~hpa_kernel.stages.predictor.Predictor` calls: each model's Step 1 x Step 2
(:func:`~hpa_kernel.stages.ensemble.combine_steps`), the models by the manifest's weights
(:func:`~hpa_kernel.stages.ensemble.combine_models`), then the class selection
(:func:`~hpa_kernel.stages.ensemble.select_top_classes`, the manifest's ``top_classes`` and
``min_confidence``). The weights are fitted on the validation fold, so the numbers to
report are those of held-out images (``bench/quality.py``), never the fitted mAP printed here.

What counts as right:

* ``--truth DIR`` (a truth folder, :mod:`hpa_kernel.formats.truth`; on synthetic data the
  training set's ``truth/``): per-cell truth. Each exported cell's mask (its label PNG
  scaled to the original size, as the submission's RLE is) is matched to the truth cells by
  pixel IoU and scored exactly as :mod:`hpa_kernel.tools.metric` scores a submission (a test
  checks it against :func:`~hpa_kernel.tools.metric.evaluate_arrays`).
* without ``--truth`` (real training data has image labels only; ``train.oof`` keeps them
  in ``oof_images.csv``): an image-label objective, ``--objective``. ``images``
  (default): per class, every image ranked by its best cell's final score, one AP against
  the image labels (is the class in the image?). ``single-label-cells``: the cells of
  images with exactly one label, ranked per class, that label as their truth. Both are
  scored with the metric's own AP (:func:`hpa_kernel.tools.metric.average_precision`).
  What they are worth, measured on a synthetic validation fold against its per-cell truth
  (``bench/fit_objective.py``, BENCHMARKS.md): ``images`` follows the truth over the grid
  but its pair fit did not beat 0.5/0.5 out of half and its per-class fit lost; see there.

An export that cannot be fitted is refused with its reason (exit 2, the manifest
untouched): no cells, NaN/infinite scores (a step that did not run), fewer than two
classes with positives and negatives, an image in two folders. When the objective is the
same at every grid point (flat) nothing is fitted: a warning, and the manifest stays as it is.

The search: only ``w1 / (w1 + w2)`` matters; ``w1`` runs over ``--grid`` points of [0, 1]
and ``w2 = 1 - w1``. ``--per-class`` picks ``w1`` per class, each class at its best grid
point (classes without truth get the best common ``w1``); the mAP reported is that of the
picked 19-vector, scored again as a whole. Ties go to the ``w1`` nearest 0.5.

The output (default: the manifest itself, replaced atomically through
:func:`hpa_kernel.config.write_manifest`: a kill leaves the old file) is the manifest with
``step_weights`` = ``{"step1": w1, "step2": w2}`` or ``{"step1": [19 numbers], "step2": [19
numbers]}``, checked by :func:`hpa_kernel.config.config_from_dict`; ``<out stem>.fit.json``
beside it records what was fitted on what.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES, parse_labels
from hpa_kernel.config import KernelConfig
from hpa_kernel.stages.ensemble import combine_models, combine_steps, select_top_classes

__all__ = ["OBJECTIVES", "FitScores", "MatchTable", "WeakTable", "read_oof", "match_oof", "class_ap",
           "fit_step_weights", "main"]

logger = logging.getLogger(__name__)
#: what the fit scores without per-cell truth (see the module docstring; BENCHMARKS.md measures them)
OBJECTIVES = ("images", "single-label-cells")
DEFAULT_OBJECTIVE = "images"
_STEP1 = re.compile(r"^(.+)_step1_00$")


def read_oof(folders: Sequence[str | Path]) -> pd.DataFrame:
    """The cells of per-cell exports as one table: the export's columns, plus ``ImageWidth``,
    ``ImageHeight``, ``Label`` (the image labels of ``oof_images.csv``; ``None`` without it)
    and ``folder`` (where ``labels/<ID>.png`` is). ``ValueError`` for an image in two folders
    or folders of different models."""
    from hpa_kernel.formats.cells import read_cells
    from hpa_kernel.train.oof import IMAGES_NAME, read_image_table

    parts, models = [], None
    for folder in map(Path, folders):
        export = read_cells(folder)
        if models is not None and export.models != models:
            raise ValueError(f"{folder}: models {export.models}, the other exports' {models}")
        models = export.models
        cells = export.cells.merge(export.images[["ID", "ImageWidth", "ImageHeight"]], on="ID", how="left")
        labels = read_image_table(folder).set_index("ID")["Label"] if (folder / IMAGES_NAME).is_file() else None
        cells["Label"] = cells["ID"].map(labels) if labels is not None else None
        cells["folder"] = str(folder)
        parts.append(cells)
    table = pd.concat(parts, ignore_index=True)
    twice = table.groupby("ID")["folder"].nunique()
    if (twice > 1).any():
        raise ValueError(f"image {twice[twice > 1].index[0]} is in more than one export folder")
    return table


@dataclass
class FitScores:
    """An export's Step 1 / Step 2 scores (rows in metric order: images in sorted ID order,
    cells in table order) and the manifest's rules that turn them into final scores."""

    steps: list[tuple[np.ndarray, np.ndarray]]  # per model (step1, step2), (n, 19) float32
    model_weights: list[float]
    starts: np.ndarray  # the first row of each image
    top_n: int = 18
    floor: float = 0.0

    def final(self, w1: float | np.ndarray, w2: float | np.ndarray) -> np.ndarray:
        """``(n, 19)`` final scores at step weights ``w1``, ``w2``: the kernel's chain."""
        per_model = [combine_steps(s1, s2, w1, w2) for s1, s2 in self.steps]
        return select_top_classes(combine_models(per_model, self.model_weights), self.top_n, self.floor, self.starts)


@dataclass
class MatchTable:
    """What the metric needs, computed once for every weight: ``present (n, 19)`` whether the
    class is among the cell's image's truth labels and the cell has pixels (else the metric
    drops the detection); ``gt_key (n, 19)`` a data-set-wide id of the cell's best truth cell
    of that class (-1: none with IoU >= threshold); ``n_gt (19,)`` truth (cell, class) entries."""

    scores: FitScores
    present: np.ndarray
    gt_key: np.ndarray
    n_gt: np.ndarray

    def classes(self) -> np.ndarray:
        """The classes scored: those with truth."""
        return np.flatnonzero(self.n_gt > 0)

    def class_aps(self, w1: float | np.ndarray, w2: float | np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The metric's AP of ``classes`` at step weights ``w1``, ``w2`` (numbers or 19 each)."""
        final = self.scores.final(w1, w2)
        return np.array([class_ap(final[:, c], self.present[:, c], self.gt_key[:, c], self.n_gt[c]) for c in classes])


@dataclass
class WeakTable:
    """Image labels only: items ranked per class against weak truth, one AP per class with
    :func:`hpa_kernel.tools.metric.average_precision` (the metric's AP).

    ``objective`` ``"images"``: the items are the images, each scored by its best cell's
    final score, truth = the image's labels. ``"single-label-cells"``: the items are the
    cells (``keep``) of images with exactly one label, truth = that label.
    ``truth (items, 19)``; ``n_gt (19,)`` positives per class.
    """

    scores: FitScores
    objective: str
    keep: np.ndarray | None
    truth: np.ndarray
    n_gt: np.ndarray

    def classes(self) -> np.ndarray:
        """The classes scored: those with positives and negatives (others score 1 or 0 at any weight)."""
        return np.flatnonzero((self.n_gt > 0) & (self.n_gt < len(self.truth)))

    def class_aps(self, w1: float | np.ndarray, w2: float | np.ndarray, classes: np.ndarray) -> np.ndarray:
        from hpa_kernel.tools.metric import average_precision

        final = self.scores.final(w1, w2)
        items = final[self.keep] if self.keep is not None else np.maximum.reduceat(final, self.scores.starts, axis=0)
        return np.array([average_precision(items[:, c], self.truth[:, c], int(self.n_gt[c])) for c in classes])


def _fit_scores(table: pd.DataFrame, config: KernelConfig) -> FitScores:
    """The scores of a table in metric order, and the manifest's rules (model weights by the
    model's place ``m<k>`` in the manifest; one model alone weighs 1)."""
    from hpa_kernel.formats.cells import scores

    models = [m[1] for m in map(_STEP1.match, table.columns) if m]
    if len(models) == 1:
        weights = [1.0]
    else:
        places = [int(m[1:]) if re.fullmatch(r"m\d+", m) else -1 for m in models]
        if not all(0 <= k < len(config.classifiers) for k in places):
            raise ValueError(f"the export's models {models} are not the manifest's {len(config.classifiers)} "
                             "classifier(s) (m<k> = the k-th)")
        weights = [config.classifiers[k].weight for k in places]
    steps = [(scores(table, m, "step1"), scores(table, m, "step2")) for m in models]
    for m, (s1, s2) in zip(models, steps):
        bad = ~(np.isfinite(s1).all(axis=1) & np.isfinite(s2).all(axis=1))
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {len(table)} cells have NaN or infinite {m} Step 1 / Step 2 "
                             f"scores (first: image {table['ID'].iloc[int(np.flatnonzero(bad)[0])]}): "
                             "export them with both steps (train.oof runs both)")
    ids = table["ID"].to_numpy()
    return FitScores(steps=steps, model_weights=weights, starts=np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]),
                     top_n=config.top_classes, floor=config.min_confidence)


def _weak_table(table: pd.DataFrame, objective: str, config: KernelConfig) -> WeakTable:
    """The image-label objective ``objective`` of a table in metric order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    if table["Label"].isna().any():
        raise ValueError("the export has no image labels (oof_images.csv, written by train.oof); "
                         "give per-cell truth with --truth")
    labels = table["Label"].astype(str).to_numpy()
    fit = _fit_scores(table, config)
    if objective == "single-label-cells":
        keep = np.array([len(parse_labels(lab)) == 1 for lab in labels])
        if not keep.any():
            raise ValueError("no image of the export has exactly one label (the single-label-cells objective)")
        labels = labels[keep]
    else:
        keep, labels = None, labels[fit.starts]
    truth = np.zeros((len(labels), NUM_CLASSES), bool)
    for i, lab in enumerate(labels):
        truth[i, parse_labels(lab)] = True
    return WeakTable(scores=fit, objective=objective, keep=keep, truth=truth, n_gt=truth.sum(axis=0))


def _metric_order(table: pd.DataFrame) -> pd.DataFrame:
    order = np.argsort(table["ID"].astype(str).to_numpy(), kind="stable")  # the metric's image order
    return table.iloc[order].reset_index(drop=True)


def match_oof(
    table: pd.DataFrame, truth_dir: str | Path | None = None, iou_threshold: float = 0.6,
    objective: str = DEFAULT_OBJECTIVE, config: KernelConfig | None = None,
) -> "MatchTable | WeakTable":
    """What the fit scores (see the module docstring): a :func:`read_oof` table (or rows of
    it), against per-cell truth in ``truth_dir`` (images without truth are dropped) or,
    with ``None``, the image labels through ``objective`` (:data:`OBJECTIVES`); ``config``:
    the manifest's rules (default: the defaults). Refuses (``ValueError``, one line) a table
    without rows, with non-finite scores, or where fewer than two classes have truth."""
    if table.empty:
        raise ValueError("the export has no cells")
    config = config or KernelConfig()
    if truth_dir is None:
        m = _weak_table(_metric_order(table), objective, config)
    else:
        m = _match_truth(table, truth_dir, iou_threshold, config)
    if len(m.classes()) < 2:
        found = ", ".join(f"{c} ({CLASS_NAMES[c]})" for c in np.flatnonzero(m.n_gt > 0)) or "none"
        raise ValueError(f"the export has truth for class(es) {found} only"
                         f"{' (or every item has it)' if len(found.split(',')) >= 2 else ''}: "
                         "fitting 19 classes' weights needs at least two classes with positives and negatives")
    return m


def _image_ious(rows: pd.DataFrame, truth: np.ndarray, truth_ids: np.ndarray) -> np.ndarray:
    """Pixel IoU ``(cells, truth cells)`` of one image's exported cells (their label PNG scaled
    to the original size, as the submission's masks) with its truth cells: the metric's numbers."""
    from hpa_kernel.formats.cells import read_labels
    from hpa_kernel.stages.cellmatch import contingency
    from hpa_kernel.stages.labels import resize_labels

    first = rows.iloc[0]
    w, h = int(first["ImageWidth"]), int(first["ImageHeight"])
    if truth.shape != (h, w):
        raise ValueError(f"{first['ID']}: truth labels are {truth.shape[1]}x{truth.shape[0]}, the export says {w}x{h}")
    pred = resize_labels(read_labels(first["folder"], str(first["ID"])), w, h)
    cells = rows["cell_id"].to_numpy(np.int64)
    table = contingency(pred, truth, max(int(cells.max()), int(pred.max())), int(truth_ids.max()))
    inter = table[np.ix_(cells, truth_ids)]
    union = table[cells].sum(axis=1)[:, None] + table[:, truth_ids].sum(axis=0)[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def _match_truth(table: pd.DataFrame, truth_dir: str | Path, iou_threshold: float, config: KernelConfig) -> MatchTable:
    from hpa_kernel.formats.truth import read_label_image, read_truth_index
    from hpa_kernel.tools.metric import gt_matrix

    truth = read_truth_index(truth_dir)
    table = table[table["ID"].astype(str).isin(set(truth))]
    if table.empty:
        raise ValueError(f"no image of the export has truth in {truth_dir}")
    table = _metric_order(table)
    present = np.zeros((len(table), NUM_CLASSES), bool)
    gt_key = np.full((len(table), NUM_CLASSES), -1, np.int64)
    n_gt = np.zeros(NUM_CLASSES, np.int64)
    key0, has_pixels = 0, table["area"].to_numpy() > 0
    for image_id, rows in table.groupby("ID", sort=False).indices.items():
        ids, has = gt_matrix(truth[str(image_id)])  # the metric's truth: cells with a class, in id order
        if not len(ids):
            continue
        n_gt += has.sum(axis=0)
        iou = _image_ious(table.iloc[rows], read_label_image(truth_dir, str(image_id)), ids)
        present[rows] = has.any(axis=0)[None, :] & has_pixels[rows, None]
        for c in np.flatnonzero(has.any(axis=0)):
            cand = np.flatnonzero(has[:, c])
            best = cand[iou[:, cand].argmax(axis=1)]  # ties: the lowest truth id
            ok = iou[np.arange(len(rows)), best] >= iou_threshold
            gt_key[rows, c] = np.where(ok, key0 + best, -1)
        key0 += len(ids)
    return MatchTable(scores=_fit_scores(table, config), present=present, gt_key=gt_key, n_gt=n_gt)


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
    ap = np.stack([m.class_aps(a, b, classes) for a, b in zip(w, w2)])  # (grid, classes)
    pref = -np.abs(w - 0.5)  # ties: nearest 0.5

    def best(score: np.ndarray) -> int:
        return int(np.lexsort((pref, np.round(score, 12)))[-1])

    common = best(ap.mean(axis=1))
    flat = bool(np.ptp(np.round(ap, 12), axis=0).max() == 0)
    out = {"grid": w.tolist(), "classes": classes.tolist(), "ap": ap, "flat": flat,
           "mAP_default": float(m.class_aps(0.5, 0.5, classes).mean())}
    if per_class:
        at = np.full(NUM_CLASSES, common)  # grid index per class; classes without truth: the common pick
        at[classes] = [best(ap[:, j]) for j in range(len(classes))]
        out.update(step1=w[at].tolist(), step2=w2[at].tolist(), mAP=float(m.class_aps(w[at], w2[at], classes).mean()))
    else:
        out.update(step1=float(w[common]), step2=float(w2[common]), mAP=float(ap[common].mean()))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.fit_weights", description=__doc__.splitlines()[0])
    ap.add_argument("--oof", required=True, type=Path, nargs="+",
                    help="per-cell export folder(s) of validation images (train.oof's --out)")
    ap.add_argument("--manifest", required=True, type=Path, help="the manifest to give the weights")
    ap.add_argument("--out", type=Path, help="manifest to write (default: --manifest itself, replaced atomically)")
    ap.add_argument("--truth", type=Path,
                    help="per-cell truth folder (labels/ + cells.csv); default: the image labels (--objective)")
    ap.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                    help=f"without --truth: what is ranked against the image labels (default {DEFAULT_OBJECTIVE}: "
                         "per class, the images by their best cell's final score)")
    ap.add_argument("--per-class", action="store_true", help="one weight pair per class (19-vectors)")
    ap.add_argument("--grid", type=int, default=21, help="points of w1 in [0, 1] (default 21: steps of 0.05)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.grid < 2:
        ap.error("--grid needs at least 2 points")
    from hpa_kernel.config import ConfigError, config_from_dict, load_config

    out = args.out or args.manifest
    try:
        config = load_config(args.manifest, allow_outside=True)  # checked by the kernel's reader, then edited
        manifest = json.loads(args.manifest.read_text())
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 2
    what = f"local mAP against {args.truth}" if args.truth else f"image-label mAP, objective {args.objective}"
    try:
        table = read_oof(args.oof)
        logger.info("grid %d, per_class %s, %s; top_classes %d, min_confidence %g (the manifest's)",
                    args.grid, args.per_class, what, config.top_classes, config.min_confidence)
        if args.per_class and not args.truth:
            logger.warning("--per-class from image labels lost per-cell mAP out of half against 0.5/0.5 on the "
                           "synthetic validation fold (BENCHMARKS.md)")
        m = match_oof(table, args.truth, objective=args.objective, config=config)
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
    record.update(oof=[str(p) for p in args.oof], truth=str(args.truth) if args.truth else "image labels",
                  objective="per-cell truth, mask IoU" if args.truth else args.objective,
                  manifest=str(args.manifest), images=int(table["ID"].nunique()), cells=len(table))
    write_manifest(out, manifest)
    atomic_write(out.with_name(f"{out.stem}.fit.json"), (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    raise SystemExit(main())
