"""Step 1 — CAM ∩ cells: per-cell class confidences from the image-level class maps.

See ``docs/METHOD.md`` ("Step 1"). For every class ``c`` with image probability
``p_c > min_prob`` the class activation map ``CAM_c`` (``(h, w)``, in [0, 1]) is resized
to the label image (``cv2.INTER_LINEAR``) and every cell gets::

    conf[i, c] = clip(q(CAM_c inside cell i) * p_c / q(CAM_c over the whole image), 0, p_c)

kept only when ``conf / p_c > min_ratio``. ``q`` is ``np.quantile(..., 0.99)`` (numpy's
default ``"linear"`` rule) itself: :func:`grouped_quantiles` sorts the pixels by cell
once and takes ``np.quantile`` of each cell's slice, all classes at once.
``tests/oracles.py`` has the reference written with a full mask per cell and class.
"""

from __future__ import annotations

import cv2
import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES
from hpa_kernel.stages.labels import cell_index, present_ids

__all__ = ["step1_scores", "resize_maps", "grouped_quantiles"]


def _to_numpy(x) -> np.ndarray:
    """Accept numpy arrays or (CPU/GPU) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``(k, h, w)`` maps to class-major ``(k, height * width)`` float32 (``cv2.INTER_LINEAR``)."""
    maps = np.asarray(maps, dtype=np.float32)
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for c in range(maps.shape[0]):  # one cv2 call per map, written in place
        cv2.resize(np.ascontiguousarray(maps[c]), (width, height), dst=out[c], interpolation=cv2.INTER_LINEAR)
    return out.reshape(maps.shape[0], height * width)


def grouped_quantiles(
    values: np.ndarray, group: np.ndarray, n_groups: int, quantile: float = 0.99
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group and whole-row quantiles of every row of ``values``: ``np.quantile`` itself.

    Args:
        values: class-major ``(k, P)`` float32: one row per class, one column per pixel.
        group: ``(P,)`` int group of each pixel in ``0..n_groups``; ``n_groups`` marks
            pixels in no group (they still count for the whole-row quantile).
        n_groups: number of real groups (cells).
        quantile: in [0, 1].

    Returns:
        ``(q_group (n_groups, k), q_all (k,), counts (n_groups,) int64)``, the quantiles in
        ``values``' dtype; empty groups get 0.

    The pixels are sorted by group once (a stable argsort of ``group``); each group is
    then one contiguous slice, and ``np.quantile(slice, axis=1)`` does every class at once.
    The loop is over groups (cells), each step cell-sized; measured faster than one
    ``(group, value)`` sort per class, and equal to ``np.quantile`` by construction.
    """
    values = np.asarray(values)
    group = np.asarray(group).reshape(-1)
    k = values.shape[0]
    counts = np.bincount(group, minlength=n_groups + 1)[:n_groups].astype(np.int64)
    q_all = np.quantile(values, quantile, axis=1) if values.shape[1] else np.zeros(k, values.dtype)
    q_group = np.zeros((n_groups, k), dtype=q_all.dtype)
    by_group = values[:, np.argsort(group, kind="stable")]
    ends = np.cumsum(counts)
    for g in np.flatnonzero(counts):  # cells, not pixels: each slice is one cell's pixels
        q_group[g] = np.quantile(by_group[:, ends[g] - counts[g] : ends[g]], quantile, axis=1)
    return q_group, q_all, counts


def _cam_confidences(
    cams: np.ndarray, probs: np.ndarray, labels: np.ndarray, cell_ids: np.ndarray, min_ratio: float, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """Step 1's rule for the examined classes: ``(conf, keep)``, each ``(n, k)``, from their
    ``(k, h, w)`` CAMs and ``(k,)`` probabilities (see :func:`step1_scores`)."""
    order = np.argsort(cell_ids, kind="stable")
    sorted_ids = cell_ids[order]
    H, W = labels.shape
    q_cell, q_img, counts = grouped_quantiles(
        resize_maps(cams, H, W), cell_index(labels, sorted_ids), len(cell_ids), quantile=quantile
    )
    # back to the caller's cell order (duplicates in cell_ids share one group)
    first = np.searchsorted(sorted_ids, cell_ids)
    q_cell, counts = q_cell[first].astype(np.float64), counts[first]
    q_img = q_img.astype(np.float64)[None, :]
    p = probs[None, :]
    safe = np.where(q_img > 0, q_img, 1.0)
    conf = np.where(q_img > 0, np.clip(q_cell * p / safe, 0.0, p), np.where(q_cell > 0, p, 0.0))
    return conf, (conf / p > min_ratio) & (counts[:, None] > 0)


def step1_scores(
    cams,
    probs,
    labels: np.ndarray,
    cell_ids: np.ndarray | None = None,
    min_prob: float = 0.01,
    min_ratio: float = 0.02,
    quantile: float = 0.99,
) -> np.ndarray:
    """Per-cell class confidences from CAMs and image-level probabilities (``docs/METHOD.md``, "Step 1").

    Args:
        cams: ``(19, h, w)`` class activation maps in [0, 1] (numpy or torch).
        probs: ``(19,)`` image-level sigmoid probabilities.
        labels: ``(H, W)`` int label image (0 = background); the CAMs are resized to it.
        cell_ids: ``(n,)`` the cells to score (default: the labels present, ascending).
            Ids absent from ``labels`` are cells without pixels: never given a CAM class.
        min_prob: a class is examined only if ``p_c > min_prob``.
        min_ratio: a (cell, class) is kept only if ``conf / p_c > min_ratio``.
        quantile: the per-cell and per-image quantile (numpy's linear definition).

    Returns:
        ``(n, 19)`` float32, row ``i`` = cell ``cell_ids[i]``, 0 where nothing was kept.

    How many classes an image keeps is not decided here but once, after the ensemble
    (:func:`hpa_kernel.stages.ensemble.select_top_classes`).

    Negative (class 18), our reading of the method (it matches the write-up's code):

    * Negative is examined through its CAM like every other class when ``p_18 > min_prob``.
    * A cell left with no class gets ``conf[i, 18] = p_18``.
    * "When nothing at all was found" = no (cell, class) pair was kept for any cell. Then every cell gets only Negative, with confidence ``max(p)`` (max over all
      19 probabilities) when the CAM∩cell intersection was *empty*, i.e. at least one class
      passed ``min_prob`` and was intersected with the cells but every pair fell below
      ``min_ratio``; and ``1 - max(p)`` when no class passed ``min_prob`` at all (no CAM
      was intersected: the image looks negative, and the lower ``max(p)``, the surer).

    Edge cases: ``q(image) == 0`` is read as the limit (``conf = p_c`` when the cell's
    quantile is positive, else 0); non-finite CAM values are treated as 0. Memory: the
    examined maps resized to the labels, ``k * H * W`` float32 (19 MB at 512²).
    """
    cams = np.nan_to_num(_to_numpy(cams).astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    probs = _to_numpy(probs).astype(np.float64).reshape(-1)
    labels = np.asarray(labels)
    if cams.ndim != 3 or cams.shape[0] != NUM_CLASSES or probs.shape[0] != NUM_CLASSES:
        raise ValueError(f"expected cams (19, h, w) and probs (19,), got {cams.shape} and {probs.shape}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if cell_ids is None:
        cell_ids = present_ids(labels)
    cell_ids = np.asarray(cell_ids).astype(np.int64, copy=False).reshape(-1)
    n = len(cell_ids)
    scores = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    if n == 0:
        return scores

    active = np.flatnonzero(probs > min_prob)
    kept = np.zeros((n, NUM_CLASSES), dtype=bool)
    if len(active):
        conf, keep = _cam_confidences(cams[active], probs[active], labels, cell_ids, min_ratio, quantile)
        scores[:, active] = np.where(keep, conf, 0.0)
        kept[:, active] = keep

    if not kept.any():
        neg = float(np.nanmax(probs)) if len(active) else 1.0 - float(np.nanmax(probs))
        scores[:, NEGATIVE] = neg
        return scores

    missing = ~kept.any(axis=1)
    scores[missing, NEGATIVE] = probs[NEGATIVE]
    return scores
