"""Label images: the helpers every stage shares (array in, array out).

A label image is a 2-D integer array, 0 = background, ``1..n`` = cells (any dtype that
holds them; the segmenters give ``int32``). Cell ids are the labels present, ascending.

* :func:`present_ids` -- the cell ids of a label image.
* :func:`cell_index` -- every pixel's row in a list of cell ids (one gather).
* :func:`resize_labels` -- nearest-neighbour scaling (``cv2.INTER_NEAREST``), exact labels.
* :func:`label_boxes` -- bounding boxes of cells (one ``scipy.ndimage.find_objects`` pass).
* :func:`label_runs` -- runs of equal labels in column-major order (what RLE encodes).
* :func:`remove_small_labels` -- zero the labels smaller than an area.
* :func:`relabel` -- labels renumbered ``1..n`` (``skimage.segmentation.relabel_sequential``),
  other label images mapped through the same table.
"""

from __future__ import annotations

from typing import Iterable

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

__all__ = [
    "present_ids",
    "cell_index",
    "resize_labels",
    "label_boxes",
    "label_runs",
    "remove_small_labels",
    "relabel",
    "check_size",
]

_INT32_MAX = np.iinfo(np.int32).max


def present_ids(labels: np.ndarray) -> np.ndarray:
    """The non-zero labels present in ``labels``, ascending, int64 (bincount, no sort)."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0:
        ids = np.flatnonzero(np.bincount(flat))
    else:
        ids = np.unique(flat)
    return ids[ids != 0].astype(np.int64)


def cell_index(labels: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Row of every pixel's cell in the ascending ``cell_ids``; ``len(cell_ids)`` elsewhere.

    Returns a flat ``(labels.size,)`` int32 array (raster order). Pixels of label 0 or of a
    label not in ``cell_ids`` get ``len(cell_ids)``. One gather through a lookup table when
    the labels are small non-negative integers, else a binary search.
    """
    cell_ids = np.asarray(cell_ids, dtype=np.int64).reshape(-1)
    n = len(cell_ids)
    flat = np.asarray(labels).ravel()
    if n == 0 or flat.size == 0:
        return np.zeros(flat.shape, dtype=np.int32)
    top = int(flat.max())
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0 and top <= 4 * flat.size:
        lut = np.full(top + 1, n, dtype=np.int32)
        ids = cell_ids[(cell_ids > 0) & (cell_ids <= top)]
        lut[ids] = np.searchsorted(cell_ids, ids)
        return lut[flat]
    pos = np.searchsorted(cell_ids, flat)
    pos_c = np.minimum(pos, n - 1)
    hit = (cell_ids[pos_c] == flat) & (flat != 0)
    return np.where(hit, pos_c, n).astype(np.int32)


def check_size(height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` as ints; ``ValueError`` unless both are positive integers (the one rule
    for a mask's size, shared with :mod:`hpa_kernel.formats.rle`)."""
    h, w = int(height), int(width)
    if h != height or w != width or h <= 0 or w <= 0:
        raise ValueError(f"mask size must be positive integers, got {height}x{width}")
    return h, w


def _label_dtype(labels: np.ndarray) -> np.dtype:
    """Smallest dtype cv2 resizes exactly that holds every label (uint16 or int32)."""
    if labels.size == 0:
        raise ValueError("label image is empty")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"label image must have an integer dtype, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"label image has negative labels (min {lo})")
    if hi <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if hi <= _INT32_MAX:
        return np.dtype(np.int32)
    raise ValueError(f"label {hi} does not fit in int32")


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale a label image to ``height x width`` with nearest neighbour (``cv2.INTER_NEAREST``).

    Labels are carried as uint16 when they fit, else int32 (cv2 silently narrows int64, so
    it is never passed int64). Returns the resized labels in that dtype; a label image that
    already has the target size is returned as a (possibly converted) array without resizing.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label image must be 2-D, got shape {labels.shape}")
    h, w = check_size(height, width)
    arr = labels.astype(_label_dtype(labels), copy=False)
    if arr.shape == (h, w):
        return arr
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_NEAREST)


def label_boxes(labels: np.ndarray, cell_ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Bounding boxes ``(n, 4)`` int64 as ``(y0, x0, y1, x1)``, half-open, one per cell id.

    One ``scipy.ndimage.find_objects`` pass over the label image; an id that is absent (or
    ``<= 0``) gets the empty box ``(0, 0, 0, 0)``.
    """
    cell_ids = np.asarray(cell_ids if isinstance(cell_ids, np.ndarray) else list(cell_ids), dtype=np.int64).reshape(-1)
    boxes = np.zeros((cell_ids.size, 4), dtype=np.int64)
    lab = np.asarray(labels)
    if cell_ids.size == 0 or lab.size == 0:
        return boxes
    if not np.issubdtype(lab.dtype, np.integer):
        lab = lab.astype(np.int64)
    max_label = int(max(cell_ids.max(), 0))
    if max_label == 0:
        return boxes
    objects = ndimage.find_objects(lab, max_label=max_label)
    for i, cid in enumerate(cell_ids.tolist()):  # n small tuples: no pixel work here
        sl = objects[cid - 1] if 0 < cid <= len(objects) else None
        if sl is not None:
            boxes[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    return boxes


def label_runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal labels in the Fortran-order (column-major) flattening of ``labels``.

    Returns ``(starts, lengths, values)``: one entry per maximal run, in flattening order.
    """
    flat = np.ascontiguousarray(np.asarray(labels).T).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    ends = np.concatenate((change, [flat.size])).astype(np.int64)
    return starts, ends - starts, flat[starts]


def remove_small_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero every label whose pixel count is ``< min_area`` (the other labels kept as they are).

    "size < threshold" (the old scikit-image ``min_size``) with ``np.bincount``, so that a
    fractional (scaled) threshold stays exact. Returns ``labels`` itself when nothing goes.
    """
    if min_area <= 1 or labels.size == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    too_small = sizes < min_area
    too_small[0] = False
    if not too_small.any():
        return labels
    out = labels.copy()
    out[too_small[labels]] = 0
    return out


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered ``1..n`` in ascending order of the old ones, as int32
    (``skimage.segmentation.relabel_sequential``)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int32)
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)
