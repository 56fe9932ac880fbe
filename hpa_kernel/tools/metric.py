"""Local mAP@0.6 of a submission against per-cell ground truth (Open Images challenge style).

The rules (``docs/METHOD.md``, "Metric"):

* Ground truth is one entry per (cell, class); an image's labels are the union of its cells'
  classes. Only images with ground truth are scored; an image with ground truth that is
  missing from the submission counts (it simply has no detections).
* A detection whose class is not among its image's labels is **dropped** (neither true nor
  false positive), and so is a detection with an empty mask.
* Per image and class, detections are taken in descending confidence (stable: ties keep
  submission order). Each is compared only with its single highest-IoU ground-truth cell
  of that class (ties: the lowest cell id): a true positive if that IoU is >= 0.6 and the
  cell is not yet taken, otherwise a false positive -- no fall-back to the next cell.
* Per class, detections are pooled over images (stable sort by descending confidence;
  ties keep image order, images in sorted ID order) and AP is the all-point interpolated
  area under the precision-recall curve, precision made monotone from the high-recall end.
  A class with ground truth but no detection scores 0; a class without ground truth is
  left out of the mean.
* IoU is pixel IoU of the masks (``iou="mask"``) or IoU of their bounding boxes
  (``iou="box"``, as the host's re-scoring code: half-open pixel boxes
  ``[min, max + 1)``).

Layers, lowest first: :func:`average_precision` (one class), :func:`score_image` (one
image, in-memory arrays), :func:`evaluate_arrays` (in-memory data set), :func:`evaluate`
(submission CSV or rows + truth folder, streamed one image at a time), :func:`main` (CLI)::

    python -m hpa_kernel.tools.metric --truth DIR [--iou mask|box] SUBMISSION

Truth folder: ``DIR/labels/<ID>.png`` + ``DIR/cells.csv``, read by
:mod:`hpa_kernel.formats.truth` (the one reader and writer; its names are re-exported here).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES
from hpa_kernel.formats.rle import decode_mask
from hpa_kernel.stages.labels import label_boxes
from hpa_kernel.formats.submission import Row, parse_prediction_string, read_submission
from hpa_kernel.formats.truth import TruthError, read_label_image, read_truth_index  # noqa: F401 (the one reader)

logger = logging.getLogger(__name__)

IOU_THRESHOLD: float = 0.6
IOU_MODES: tuple[str, ...] = ("mask", "box")

Detection = tuple[int, float, np.ndarray]
"""One detection: ``(class_id, confidence, mask)``, mask a boolean (H, W) array."""


class SubmissionError(ValueError):
    """The submission is malformed (the message names the image and the fault)."""


class ImageTruth(NamedTuple):
    """Ground truth of one image: the label image and the classes of each cell."""

    labels: np.ndarray
    """(H, W) non-negative integer label image, 0 = background."""
    cell_classes: Mapping[int, Iterable[int]]
    """cell id -> its classes (an image's labels are the union of these)."""


@dataclass
class ImageScore:
    """Per-image matching result, ready to be pooled over images.

    ``confidences[c]`` / ``is_tp[c]`` hold the scored (not dropped) detections of class
    ``c`` in matching order; ``n_gt[c]`` counts the (cell, class) truth entries.
    """

    n_gt: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    confidences: dict[int, np.ndarray] = field(default_factory=dict)
    is_tp: dict[int, np.ndarray] = field(default_factory=dict)
    n_dropped: int = 0


@dataclass
class MetricResult:
    """mAP and its per-class breakdown.

    ``per_class``, ``n_gt``, ``n_det`` and ``n_tp`` have one entry per class with ground
    truth (the classes averaged into ``mAP``); ``n_det`` counts the scored detections
    (dropped ones excluded). ``mAP`` is NaN when no class has ground truth.
    """

    mAP: float
    per_class: dict[int, float]
    n_gt: dict[int, int]
    n_det: dict[int, int]
    n_tp: dict[int, int]
    iou: str = "mask"
    n_images: int = 0
    n_dropped: int = 0

    def format_table(self) -> str:
        """Per-class table (class id, name, n_gt, n_det, AP), one class a line, all 19.

        Classes without ground truth show ``-`` as AP. The table does not include the
        ``mAP`` line (the CLI prints that last).
        """
        width = max(len(n) for n in CLASS_NAMES)
        lines = [f"{'class':>5}  {'name':<{width}}  {'n_gt':>6}  {'n_det':>6}  {'AP':>8}"]
        for c in range(NUM_CLASSES):
            ap = f"{self.per_class[c]:.6f}" if c in self.per_class else "-"
            lines.append(
                f"{c:>5}  {CLASS_NAMES[c]:<{width}}  {self.n_gt.get(c, 0):>6}  "
                f"{self.n_det.get(c, 0):>6}  {ap:>8}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- AP


def average_precision(confidences: np.ndarray, is_tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP of one class (Open Images / VOC 2010+).

    Args:
        confidences: (k,) detection confidences, pooled over images.
        is_tp: (k,) bool, whether each detection is a true positive.
        n_gt: number of ground-truth entries of the class (> 0).

    Detections are ranked by descending confidence with a stable sort (ties keep the
    given order). Precision is made monotone from the high-recall end and integrated over
    the recall steps. No detections -> 0.0.
    """
    if n_gt <= 0:
        raise ValueError("average precision needs n_gt > 0")
    confidences = np.asarray(confidences, dtype=np.float64).ravel()
    is_tp = np.asarray(is_tp, dtype=bool).ravel()
    if confidences.shape != is_tp.shape:
        raise ValueError(f"{confidences.shape=} and {is_tp.shape=} differ")
    if confidences.size == 0:
        return 0.0
    tp = is_tp[np.argsort(-confidences, kind="stable")]
    ctp = np.cumsum(tp)
    precision = ctp / np.arange(1, tp.size + 1)
    recall = ctp / n_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    d_recall = np.diff(recall, prepend=0.0)
    return float(np.sum(d_recall * precision))


# ----------------------------------------------------------------------------- IoU


def mask_boxes(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Bounding boxes ``(y0, x0, y1, x1)`` (half-open) of boolean masks; empty -> zeros."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for i, m in enumerate(masks):
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(m[rows[0] : rows[-1] + 1].any(axis=0))
        boxes[i] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of half-open integer boxes ``(y0, x0, y1, x1)``."""
    a = np.asarray(a, dtype=np.int64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.int64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ih = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    iw = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(ih, 0, None) * np.clip(iw, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def mask_iou(
    masks: Sequence[np.ndarray], labels: np.ndarray, cell_ids: np.ndarray, boxes: np.ndarray | None = None
) -> np.ndarray:
    """Pixel IoU matrix (len(masks), len(cell_ids)) of boolean masks vs. labelled cells.

    Each mask is cropped to its bounding box and ``np.bincount`` of the labels under it
    gives its intersection with every cell at once; cell areas come from one bincount of
    the label image. A cell id absent from the image has area 0 (IoU 0).
    """
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    n = int(max(labels.max(initial=0), cell_ids.max(initial=0))) + 1
    cell_area = np.bincount(labels.ravel(), minlength=n)[cell_ids]
    inter = np.zeros((len(masks), cell_ids.size), dtype=np.int64)
    det_area = np.zeros(len(masks), dtype=np.int64)
    boxes = mask_boxes(masks) if boxes is None else boxes  # callers that have them pass them
    for i, (m, (y0, x0, y1, x1)) in enumerate(zip(masks, boxes)):
        under = labels[y0:y1, x0:x1][m[y0:y1, x0:x1]]
        det_area[i] = under.size
        inter[i] = np.bincount(under, minlength=n)[cell_ids]
    union = det_area[:, None] + cell_area[None, :] - inter
    # int / int division is correctly rounded, so e.g. 3/5 == 0.6 exactly.
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


# ----------------------------------------------------------------------------- matching


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label image must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("label image has negative labels")
    if not np.can_cast(labels.dtype, np.intp):  # e.g. uint64: np.bincount refuses it
        labels = labels.astype(np.intp)
    return labels


def gt_matrix(cell_classes: Mapping[int, Iterable[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(cell_ids (n,), has_class (n, 19) bool) of the cells that carry at least one class, in
    id order: the truth the metric matches against (also :mod:`hpa_kernel.train.fit_weights`')."""
    ids, rows = [], []
    for cell, classes in sorted((int(k), v) for k, v in cell_classes.items()):
        row = np.zeros(NUM_CLASSES, dtype=bool)
        for c in classes:
            c = int(c)
            if not 0 <= c < NUM_CLASSES:
                raise ValueError(f"cell {cell}: class {c} is outside 0..{NUM_CLASSES - 1}")
            row[c] = True
        if cell <= 0:
            raise ValueError(f"cell id {cell} must be >= 1 (0 is background)")
        if row.any():
            ids.append(cell)
            rows.append(row)
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, NUM_CLASSES), bool)
    return np.asarray(ids, dtype=np.int64), np.stack(rows)


def match_class(ious: np.ndarray, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Greedy Open Images matching of one class on one image.

    Args:
        ious: (k, m) IoU of the k detections (already in matching order, best first)
            with the m ground-truth cells of the class.

    Returns:
        (k,) bool: each detection is compared only with its highest-IoU cell (ties: the
        first); it is a TP if that IoU >= threshold and no earlier TP took the cell.
    """
    k, m = ious.shape
    if k == 0 or m == 0:
        return np.zeros(k, dtype=bool)
    best = ious.argmax(axis=1)
    return take_cells(np.where(ious[np.arange(k), best] >= iou_threshold, best, -1))


def take_cells(best: np.ndarray) -> np.ndarray:
    """The matching rule behind :func:`match_class`: ``best[i]`` is detection i's best cell
    (any integer key, -1: none at the IoU threshold), detections in matching order.

    Only a TP takes a cell, and every eligible detection would be a TP were its cell free:
    so the TPs (returned, (k,) bool) are the first eligible detection of each cell.
    """
    best = np.asarray(best, dtype=np.int64)
    tp = np.zeros(best.size, dtype=bool)
    eligible = np.flatnonzero(best >= 0)
    _, first = np.unique(best[eligible], return_index=True)
    tp[eligible[first]] = True
    return tp


def _score_distinct(
    labels: np.ndarray,
    cell_classes: Mapping[int, Iterable[int]],
    classes: np.ndarray,
    confidences: np.ndarray,
    mask_index: np.ndarray,
    masks: Sequence[np.ndarray],
    iou: str,
    iou_threshold: float,
) -> ImageScore:
    """:func:`score_image` on detections that index a list of distinct masks."""
    cell_ids, has = gt_matrix(cell_classes)
    out = ImageScore(n_gt=has.sum(axis=0).astype(np.int64))
    present = out.n_gt > 0
    boxes = mask_boxes(masks)  # one pass per distinct mask; an empty mask has an empty box
    nonempty = boxes[:, 2] > boxes[:, 0]
    keep = present[classes] & nonempty[mask_index] if classes.size else np.zeros(0, bool)
    out.n_dropped = int(classes.size - keep.sum())
    if not keep.any():
        return out
    used = np.unique(mask_index[keep])
    remap = np.full(len(masks), -1)
    remap[used] = np.arange(used.size)
    used_masks = [masks[i] for i in used]
    if iou == "mask":
        iou_matrix = mask_iou(used_masks, labels, cell_ids, boxes=boxes[used])
    else:
        iou_matrix = box_iou(boxes[used], label_boxes(labels, cell_ids))
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(-confidences[kept], kind="stable")]
    for c in np.unique(classes[kept]):
        det = kept[classes[kept] == c]
        tp = match_class(iou_matrix[np.ix_(remap[mask_index[det]], np.flatnonzero(has[:, c]))], iou_threshold)
        out.confidences[int(c)] = confidences[det]
        out.is_tp[int(c)] = tp
    return out


def _check_iou(iou: str) -> None:
    if iou not in IOU_MODES:
        raise ValueError(f"iou must be one of {IOU_MODES}, got {iou!r}")


def score_image(
    labels: np.ndarray,
    cell_classes: Mapping[int, Iterable[int]],
    detections: Sequence[Detection],
    iou: str = "mask",
    iou_threshold: float = IOU_THRESHOLD,
) -> ImageScore:
    """Match one image's detections against its ground truth.

    Args:
        labels: (H, W) label image, 0 = background.
        cell_classes: cell id -> classes; cells without classes are not ground truth.
        detections: ``(class_id, confidence, mask)`` in submission order; masks (H, W).
            Masks that are the same object are treated as one (IoU computed once).
        iou: ``"mask"`` (pixel IoU) or ``"box"`` (bounding-box IoU).
        iou_threshold: minimum IoU of a true positive (inclusive).

    Raises:
        ValueError: bad class id, non-finite confidence, or a mask of another shape.
    """
    _check_iou(iou)
    labels = _check_labels(labels)
    masks: list[np.ndarray] = []
    seen: dict[int, int] = {}
    classes = np.zeros(len(detections), dtype=np.int64)
    confidences = np.zeros(len(detections), dtype=np.float64)
    mask_index = np.zeros(len(detections), dtype=np.int64)
    for i, (c, conf, mask) in enumerate(detections):
        if int(c) != c or not 0 <= int(c) < NUM_CLASSES:
            raise ValueError(f"detection {i}: class {c!r} is outside 0..{NUM_CLASSES - 1}")
        if not math.isfinite(float(conf)):
            raise ValueError(f"detection {i}: confidence {conf!r} is not finite")
        key = id(mask)
        if key not in seen:
            m = np.asarray(mask, dtype=bool)
            if m.shape != labels.shape:
                raise ValueError(f"detection {i}: mask shape {m.shape} != label image shape {labels.shape}")
            seen[key] = len(masks)
            masks.append(m)
        classes[i], confidences[i], mask_index[i] = int(c), float(conf), seen[key]
    return _score_distinct(labels, cell_classes, classes, confidences, mask_index, masks, iou, iou_threshold)


def summarize(scores: Iterable[ImageScore], iou: str = "mask") -> MetricResult:
    """Pool per-image scores (in the given image order) into a :class:`MetricResult`."""
    n_gt = np.zeros(NUM_CLASSES, dtype=np.int64)
    conf: dict[int, list[np.ndarray]] = {c: [] for c in range(NUM_CLASSES)}
    tp: dict[int, list[np.ndarray]] = {c: [] for c in range(NUM_CLASSES)}
    n_images = n_dropped = 0
    for s in scores:
        n_images += 1
        n_dropped += s.n_dropped
        n_gt += s.n_gt
        for c in s.confidences:
            conf[c].append(s.confidences[c])
            tp[c].append(s.is_tp[c])
    per_class, gt, det, ntp = {}, {}, {}, {}
    for c in np.flatnonzero(n_gt).tolist():
        cc = np.concatenate(conf[c]) if conf[c] else np.zeros(0)
        tt = np.concatenate(tp[c]) if tp[c] else np.zeros(0, bool)
        per_class[c] = average_precision(cc, tt, int(n_gt[c]))
        gt[c], det[c], ntp[c] = int(n_gt[c]), int(cc.size), int(tt.sum())
    mAP = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return MetricResult(mAP, per_class, gt, det, ntp, iou=iou, n_images=n_images, n_dropped=n_dropped)


def evaluate_arrays(
    truth: Mapping[str, ImageTruth | tuple[np.ndarray, Mapping[int, Iterable[int]]]],
    predictions: Mapping[str, Sequence[Detection]],
    iou: str = "mask",
    iou_threshold: float = IOU_THRESHOLD,
) -> MetricResult:
    """mAP of in-memory predictions against in-memory truth (the pure core of :func:`evaluate`).

    Args:
        truth: image id -> ``(labels (H, W), {cell_id: classes})``. Images without any
            (cell, class) entry are not scored.
        predictions: image id -> ``[(class_id, confidence, mask), ...]``; ids absent from
            ``truth`` are ignored, truth ids absent here have no detections.
        iou: ``"mask"`` or ``"box"``.
        iou_threshold: minimum IoU of a true positive (inclusive).
    """
    _check_iou(iou)

    def scores() -> Iterable[ImageScore]:
        for image_id in sorted(truth):
            labels, cell_classes = truth[image_id]
            s = score_image(labels, cell_classes, predictions.get(image_id, ()), iou, iou_threshold)
            if s.n_gt.any():
                yield s

    return summarize(scores(), iou=iou)


# ----------------------------------------------------------------------------- files


def read_rows(submission: str | Path | Mapping[str, Row]) -> Mapping[str, Row]:
    """A submission's rows: a CSV path through :func:`hpa_kernel.formats.submission.read_submission`
    (the one reader), or rows already in memory (``{ID: (width, height, predstring)}``)."""
    if isinstance(submission, Mapping):
        return submission
    path = Path(submission)
    if not path.is_file():
        raise SubmissionError(f"submission {path} does not exist")
    try:
        return read_submission(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SubmissionError(f"{e}") from None


def _row_detections(image_id: str, row: Row, labels: np.ndarray, keep_classes: np.ndarray):
    """Decode one submission row: (classes, confidences, mask_index, masks), each mask
    string decoded once; triples of classes outside ``keep_classes`` are not decoded."""
    width, height, text = row
    try:
        triples = parse_prediction_string(text or "")
    except ValueError as e:
        raise SubmissionError(f"image {image_id}: {e}") from None
    classes = np.array([t[0] for t in triples], dtype=np.int64)
    confidences = np.array([t[1] for t in triples], dtype=np.float64)
    mask_index = np.zeros(len(triples), dtype=np.int64)
    # index 0: an empty placeholder for triples left undecoded (their class is dropped)
    masks: list[np.ndarray] = [np.zeros((0, 0), bool)]
    if triples:
        if (height, width) != labels.shape:
            raise SubmissionError(
                f"image {image_id}: submission size {width}x{height} != truth size {labels.shape[1]}x{labels.shape[0]}"
            )
        decoded: dict[str, int] = {}
        for i, (c, _, s) in enumerate(triples):
            if not keep_classes[c]:
                continue  # dropped anyway: skip the decode
            if s not in decoded:
                try:
                    masks.append(decode_mask(s, height, width))
                except ValueError as e:
                    raise SubmissionError(f"image {image_id}: triple {i}: {e}") from None
                decoded[s] = len(masks) - 1
            mask_index[i] = decoded[s]
    return classes, confidences, mask_index, masks


def evaluate(
    submission: str | Path | Mapping[str, Row],
    truth_dir: str | Path,
    iou: str = "mask",
    iou_threshold: float = IOU_THRESHOLD,
) -> MetricResult:
    """mAP@0.6 of a submission against a truth folder.

    Images are streamed one at a time (one label image and its decoded masks in memory).
    Only truth images with ground truth are scored; submission rows of other IDs are
    ignored. Each distinct mask string is decoded once per image, and only for triples
    whose class is among the image's labels.

    Raises:
        TruthError: missing/malformed truth folder.
        SubmissionError: missing/malformed submission, or a size that differs from the truth.
    """
    _check_iou(iou)
    index = read_truth_index(truth_dir)
    sub = read_rows(submission)
    extra = len(set(sub) - set(index))
    if extra:
        logger.info("%d submission image(s) have no ground truth and are not scored", extra)
    missing = len(set(index) - set(sub))
    if missing:
        logger.warning("%d truth image(s) are missing from the submission (scored as no detections)", missing)

    def scores() -> Iterable[ImageScore]:
        for image_id in sorted(index):
            cell_classes = index[image_id]
            labels = _check_labels(read_label_image(truth_dir, image_id))
            present = np.bincount(labels.ravel()) > 0
            absent = [c for c in cell_classes if c >= present.size or not present[c]]
            if absent:
                logger.warning("image %s: cell(s) %s of cells.csv are not in the label image", image_id, absent[:5])
            if image_id in sub:
                keep = gt_matrix(cell_classes)[1].any(axis=0)
                det = _row_detections(image_id, sub[image_id], labels, keep)
            else:
                det = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), [])
            yield _score_distinct(labels, cell_classes, *det, iou=iou, iou_threshold=iou_threshold)

    return summarize(scores(), iou=iou)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpa_kernel.tools.metric",
        description="Local mAP@0.6 (Open Images style) of a submission against a per-cell truth folder.",
    )
    p.add_argument("submission", help="submission.csv (ID,ImageWidth,ImageHeight,PredictionString)")
    p.add_argument("--truth", required=True, help="truth folder: labels/<ID>.png + cells.csv")
    p.add_argument("--iou", choices=IOU_MODES, default="mask", help="mask (pixel) or box IoU (default: mask)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings at INFO level")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the per-class table, then ``mAP <value>`` as the last line.

    Returns 0 on success, 2 on a missing/malformed truth folder or submission (one-line
    ``error: ...`` on stderr).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = evaluate(args.submission, args.truth, iou=args.iou)
    except (TruthError, SubmissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not result.per_class:
        print(f"error: truth folder {args.truth} has no labelled cells", file=sys.stderr)
        return 2
    print(result.format_table())
    print(f"images {result.n_images}  iou {result.iou}  dropped {result.n_dropped}")
    print(f"mAP {result.mAP:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
