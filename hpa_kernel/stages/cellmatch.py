"""Merge per-cell predictions of several segmentations by matching their cells (arrays in/out).

Each input is one image's label image (0 = background, cell ``i`` has label ``i + 1``; all
inputs the same size, e.g. the original image size) and its ``(n, 19)`` cell scores.

* :func:`contingency` -- every pair intersection of two label images at once: one joint
  ``np.bincount`` over the pixels.
* :func:`iou_matrix` / :func:`match_cells` -- mask IoU of all cell pairs; a one-to-one
  matching of the pairs with IoU >= the threshold (``scipy.optimize.linear_sum_assignment``
  on the IoU matrix with the pairs below the threshold zeroed: maximal total IoU; for a
  threshold >= 0.5 this is simply every pair above it, which is unique).
* :func:`merge_cells` -- cells of all inputs grouped (each input matched against the inputs
  whose cells are already in the result, the reference first), then
  :func:`combine_scores` per cell and class.
* :class:`RankTable` -- the transform for a rank mean: a score becomes the fraction of that
  input's positive scores of the class (over the whole run) that are <= it.

Unmatched cells (``unmatched``):

* ``"zero"`` -- the output cells are the reference's; an input without a match for a cell
  counts as score 0 there (its weight stays in the denominator). Cells no reference cell
  matches are dropped.
* ``"take"`` -- a cell's score is the weighted mean over the inputs that have it (weights
  renormalised), and cells the reference lacks are taken from the first input that has
  them (their mask from that input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.stages.ensemble import check_weights

__all__ = [
    "UNMATCHED",
    "MEANS",
    "contingency",
    "iou_matrix",
    "match_cells",
    "combine_scores",
    "CellMerge",
    "merge_cells",
    "RankTable",
]

UNMATCHED: tuple[str, ...] = ("zero", "take")
MEANS: tuple[str, ...] = ("weighted", "rank")


def _flat_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both label images flattened in one common memory order (no copy when they share it)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in size: {a.shape} vs {b.shape}")
    order = "F" if a.flags.f_contiguous and b.flags.f_contiguous and not a.flags.c_contiguous else "C"
    return a.ravel(order=order), b.ravel(order=order)


def contingency(a: np.ndarray, b: np.ndarray, na: int | None = None, nb: int | None = None) -> np.ndarray:
    """Pixel counts of every label pair: ``out[i, j]`` = pixels with ``a == i`` and ``b == j``.

    ``a``, ``b``: label images of one shape, non-negative integers; ``na`` / ``nb``: their
    largest label (default: the maximum). Returns ``(na + 1, nb + 1)`` int64; row/column 0
    is the background. One joint ``np.bincount`` over the pixels.
    """
    fa, fb = _flat_pair(a, b)
    na = int(fa.max(initial=0)) if na is None else int(na)
    nb = int(fb.max(initial=0)) if nb is None else int(nb)
    dtype = np.int32 if (na + 1) * (nb + 1) < np.iinfo(np.int32).max else np.int64
    joint = fa.astype(dtype) * dtype(nb + 1) + fb.astype(dtype, copy=False)
    return np.bincount(joint, minlength=(na + 1) * (nb + 1)).reshape(na + 1, nb + 1)


def iou_matrix(
    a: np.ndarray,
    b: np.ndarray,
    areas_a: np.ndarray | None = None,
    areas_b: np.ndarray | None = None,
) -> np.ndarray:
    """Mask IoU ``(na, nb)`` of cell ``i`` of ``a`` (label ``i + 1``) with cell ``j`` of ``b``.

    ``areas_a`` / ``areas_b``: the cells' own areas when a label image cannot show them
    (overlapping masks, see :func:`hpa_kernel.formats.rle.decode_label_image`);
    default: pixel counts of the labels. Their length sets the number of cells.
    """
    na = None if areas_a is None else len(areas_a)
    nb = None if areas_b is None else len(areas_b)
    table = contingency(a, b, na, nb)
    inter = table[1:, 1:].astype(np.float64)
    aa = table[1:, :].sum(axis=1) if areas_a is None else np.asarray(areas_a, dtype=np.int64)
    ab = table[:, 1:].sum(axis=0) if areas_b is None else np.asarray(areas_b, dtype=np.int64)
    union = aa[:, None] + ab[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_cells(
    a: np.ndarray,
    b: np.ndarray,
    iou_threshold: float = 0.5,
    areas_a: np.ndarray | None = None,
    areas_b: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    ious: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of the cells of two label images by mask IoU.

    Returns ``(ia, ib, iou)``: cell ``ia[k]`` of ``a`` matches cell ``ib[k]`` of ``b``
    (0-based: label - 1) with ``iou[k] >= iou_threshold``, ``ia`` ascending. Among the
    pairs at or above the threshold the matching maximises the total IoU. ``rows`` /
    ``cols`` restrict it to those cells of ``a`` / ``b``; ``ious`` is a precomputed
    :func:`iou_matrix` of ``a`` and ``b``.
    """
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    full = iou_matrix(a, b, areas_a, areas_b) if ious is None else np.asarray(ious)
    rows = np.arange(full.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.arange(full.shape[1]) if cols is None else np.asarray(cols, dtype=np.int64)
    sub = full[np.ix_(rows, cols)]
    sub = np.where(sub >= iou_threshold, sub, 0.0)
    empty = np.zeros(0, np.int64)
    if not sub.size or not sub.any():
        return empty, empty, np.zeros(0)
    r, c = linear_sum_assignment(sub, maximize=True)
    keep = sub[r, c] >= iou_threshold
    r, c = r[keep], c[keep]
    return rows[r], cols[c], sub[r, c]


def combine_scores(
    scores: np.ndarray, present: np.ndarray, weights: Sequence[float] | None = None, unmatched: str = "zero"
) -> np.ndarray:
    """Weighted mean over inputs: ``scores (n, k, 19)``, ``present (n, k)`` bool -> ``(n, 19)``.

    ``unmatched="zero"``: an absent input counts as 0 (denominator: all weights);
    ``"take"``: only the inputs present for that cell are averaged (a cell with no present
    input of positive weight gets 0).
    """
    if unmatched not in UNMATCHED:
        raise ValueError(f"unmatched must be one of {UNMATCHED}, got {unmatched!r}")
    scores = np.asarray(scores, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    n, k = present.shape
    if scores.shape != (n, k, NUM_CLASSES):
        raise ValueError(f"scores must have shape ({n}, {k}, {NUM_CLASSES}), got {scores.shape}")
    w = np.ones(k) if weights is None else check_weights(weights, k)
    wp = present * w[None, :]  # (n, k)
    total = np.einsum("nk,nkc->nc", wp, scores)
    denom = np.full(n, w.sum()) if unmatched == "zero" else wp.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom[:, None] > 0, total / denom[:, None], 0.0)


@dataclass
class CellMerge:
    """Result of :func:`merge_cells` for one image.

    Output cell ``i`` has its mask from input ``source[i]``, cell ``cell[i]`` (0-based);
    ``members[i, j]`` is the matched cell of input ``j`` (-1: none); ``scores[i]`` the
    combined class scores.
    """

    source: np.ndarray  # (n,) int64
    cell: np.ndarray  # (n,) int64
    members: np.ndarray  # (n, k) int64
    scores: np.ndarray  # (n, 19) float64


def _checked_inputs(
    k: int, scores: Sequence[np.ndarray], weights: Sequence[float] | None, reference: int,
    areas: Sequence[np.ndarray | None] | None,
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray | None]]:
    """:func:`merge_cells`' inputs checked: ``(weights, scores (n_j, 19) float64, areas)``."""
    if k == 0 or len(scores) != k:
        raise ValueError(f"need as many score arrays as label images, got {len(scores)} and {k}")
    if not 0 <= reference < k:
        raise ValueError(f"reference must be in 0..{k - 1}, got {reference}")
    w = np.ones(k) if weights is None else check_weights(weights, k)
    areas = list(areas) if areas is not None else [None] * k
    sc = [np.asarray(s, dtype=np.float64).reshape(-1, NUM_CLASSES) for s in scores]
    for j in range(k):
        if areas[j] is not None and len(areas[j]) != len(sc[j]):
            raise ValueError(f"input {j}: {len(areas[j])} areas for {len(sc[j])} cells")
    return w, sc, areas


def merge_cells(
    labels: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    reference: int = 0,
    iou_threshold: float = 0.5,
    unmatched: str = "zero",
    areas: Sequence[np.ndarray | None] | None = None,
) -> CellMerge:
    """Match the cells of ``k`` segmentations of one image and combine their scores.

    Parameters
    ----------
    labels:
        ``k`` label images of one shape; in input ``j`` cell ``i`` has label ``i + 1``.
    scores:
        ``k`` arrays ``(n_j, 19)``: row ``i`` is cell ``i`` of that input. For a rank mean
        pass scores transformed by each input's :class:`RankTable`.
    weights:
        ``k`` non-negative weights (default all 1).
    reference:
        The input whose cells (and masks) make the output; its cells come first, in order.
    iou_threshold:
        Cells match when their mask IoU is >= this (one-to-one, :func:`match_cells`).
    unmatched:
        ``"zero"`` or ``"take"`` (module docstring).
    areas:
        Per input, the cells' own areas (``None``: pixel counts of the labels).

    Returns
    -------
    :class:`CellMerge`. Input ``j`` is matched first against the reference's cells, then
    (``"take"``) its remaining cells against cells earlier inputs added; what is left is
    added as new cells (``"take"``) or dropped (``"zero"``).
    """
    k = len(labels)
    if unmatched not in UNMATCHED:
        raise ValueError(f"unmatched must be one of {UNMATCHED}, got {unmatched!r}")
    w, sc, areas = _checked_inputs(k, scores, weights, reference, areas)
    n = [s.shape[0] for s in sc]
    source = np.full(n[reference], reference, np.int64)
    cell = np.arange(n[reference], dtype=np.int64)
    members = np.full((n[reference], k), -1, np.int64)
    members[:, reference] = cell
    for j in [x for x in range(k) if x != reference]:
        free = np.ones(n[j], bool)
        for i in dict.fromkeys(source.tolist()):  # inputs owning result cells, reference first
            rows = np.flatnonzero(source == i)
            if not free.any():
                break
            if rows.size == 0:
                continue
            ia, ib, _ = match_cells(labels[i], labels[j], iou_threshold, areas[i], areas[j],
                                    rows=cell[rows], cols=np.flatnonzero(free))
            row_of = np.full(n[i], -1, np.int64)
            row_of[cell[rows]] = rows
            members[row_of[ia], j] = ib
            free[ib] = False
        if unmatched == "take" and free.any():
            extra = np.flatnonzero(free)
            added = np.full((extra.size, k), -1, np.int64)
            added[:, j] = extra
            source = np.concatenate([source, np.full(extra.size, j, np.int64)])
            cell = np.concatenate([cell, extra])
            members = np.concatenate([members, added])

    present = members >= 0
    stack = np.zeros((source.size, k, NUM_CLASSES))
    for j in range(k):  # k inputs: gather each one's rows at once
        stack[present[:, j], j] = sc[j][members[present[:, j], j]]
    return CellMerge(source=source, cell=cell, members=members, scores=combine_scores(stack, present, w, unmatched))


class RankTable:
    """Per class, the sorted positive scores one input gave over a run (for a rank mean).

    ``RankTable.fit(matrices)`` pools ``(n, 19)`` score matrices (e.g. one per image);
    :meth:`transform` maps a score ``x > 0`` of class ``c`` to the fraction of the pooled
    positive scores of ``c`` that are ``<= x`` (in (0, 1]); 0 stays 0.
    """

    def __init__(self, values: Sequence[np.ndarray]):
        if len(values) != NUM_CLASSES:
            raise ValueError(f"need {NUM_CLASSES} per-class arrays, got {len(values)}")
        self.values = [np.sort(np.asarray(v, dtype=np.float64)) for v in values]

    @classmethod
    def fit(cls, matrices: Iterable[np.ndarray]) -> "RankTable":
        per_class: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
        for m in matrices:
            m = np.asarray(m, dtype=np.float64).reshape(-1, NUM_CLASSES)
            for c in range(NUM_CLASSES):  # 19 classes, each a vector
                col = m[:, c]
                per_class[c].append(col[col > 0])
        return cls([np.concatenate(v) if v else np.zeros(0) for v in per_class])

    def transform(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1, NUM_CLASSES)
        out = np.zeros_like(scores)
        for c, v in enumerate(self.values):
            if v.size:
                out[:, c] = np.searchsorted(v, scores[:, c], side="right") / v.size
        out[scores <= 0] = 0.0
        return out
