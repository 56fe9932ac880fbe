"""Test oracles: the straightforward versions the package's fast code is checked against.

They live here, not in the package (nothing at run time needs them); ``bench/`` imports
them from here too (one owner).

* :func:`step1_scores_reference` -- Step 1 written the obvious way (loops, full masks,
  ``np.quantile``); also :func:`voronoi_labels` / :func:`make_inputs`, its random inputs.
* :func:`label_cell_stock` -- hpacellseg's ``label_cell`` call by call.
* :func:`label_nuclei` -- hpacellseg's ``label_nuclei`` (the nuclei map alone) at any scale.
* :func:`predictions_from_labels` -- plausible U-Net outputs for a label image.
* :func:`best_match_iou` -- per true cell, its best IoU over predicted cells.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.morphology import disk

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES


def step1_scores_reference(
    cams: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    cell_ids: np.ndarray | None = None,
    min_prob: float = 0.01,
    min_ratio: float = 0.02,
    quantile: float = 0.99,
) -> np.ndarray:
    """Step 1 (docs/METHOD.md) written the obvious way: a loop over classes and cells, full masks,
    ``np.quantile``. Slow; the oracle for :func:`hpa_kernel.stages.step1.step1_scores`."""
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    probs = np.asarray(probs, dtype=np.float64)
    if cell_ids is None:
        cell_ids = [c for c in np.unique(labels) if c != 0]
    cell_ids = list(np.asarray(cell_ids).reshape(-1))
    H, W = labels.shape
    scores = np.zeros((len(cell_ids), NUM_CLASSES), dtype=np.float32)
    kept: dict[int, set[int]] = {i: set() for i in range(len(cell_ids))}
    examined = False
    for c in range(NUM_CLASSES):
        p = probs[c]
        if not p > min_prob:
            continue
        examined = True
        cam = cv2.resize(np.ascontiguousarray(cams[c]), (W, H), interpolation=cv2.INTER_LINEAR)
        q_img = float(np.quantile(cam, quantile))
        for i, cid in enumerate(cell_ids):
            inside = cam[labels == cid]
            if inside.size == 0:
                continue
            q_cell = float(np.quantile(inside, quantile))
            if q_img > 0:
                conf = min(max(q_cell * p / q_img, 0.0), p)
            else:
                conf = p if q_cell > 0 else 0.0
            if conf / p > min_ratio:
                scores[i, c] = conf
                kept[i].add(c)
    if not any(kept.values()):
        top = float(np.nanmax(probs))
        scores[:, NEGATIVE] = top if examined else 1.0 - top
        return scores
    for i, cs in kept.items():
        if not cs:
            scores[i, NEGATIVE] = probs[NEGATIVE]
    return scores


def voronoi_labels(rng: np.random.Generator, size: int, cells: int, radius: float | None = None) -> np.ndarray:
    """Random Voronoi cells (ids 1..cells) with background beyond ``radius`` of any seed."""
    seeds = rng.random((cells, 2)) * size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    best = np.full((size, size), np.inf, dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.int32)
    for i, (sy, sx) in enumerate(seeds, 1):  # loop over seeds, to make test data only
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best
        best[closer] = d[closer]
        labels[closer] = i
    radius = radius if radius is not None else 0.9 * size / np.sqrt(cells)
    labels[best > radius**2] = 0
    return labels


def make_inputs(seed: int = 0, size: int = 512, cells: int = 40, cam: int = 32, kind: str = "uniform"):
    """``(cams (19, cam, cam), probs (19,), labels (size, size))``; ``kind`` of CAM:
    ``uniform`` noise or ``smooth`` Gaussian blobs (1-3 per class, relu-like zeros)."""
    rng = np.random.default_rng(seed)
    labels = voronoi_labels(rng, size, cells)
    if kind == "uniform":
        cams = rng.random((NUM_CLASSES, cam, cam), dtype=np.float32)
    elif kind == "smooth":
        yy, xx = np.mgrid[:cam, :cam].astype(np.float32)
        cams = np.zeros((NUM_CLASSES, cam, cam), np.float32)
        for c in range(NUM_CLASSES):  # test data only
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.random(2) * cam
                r2 = (0.05 + 0.1 * rng.random()) * cam**2
                cams[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r2)
        cams = np.maximum(cams - 0.1, 0) / np.maximum(cams.max(axis=(1, 2), keepdims=True) - 0.1, 1e-6)
    elif kind == "plateau":  # flat parts: constant maps, raised floors, clipped tops
        cams = rng.random((NUM_CLASSES, cam, cam), dtype=np.float32)
        cams[:5] = 1.0
        cams[5:12] = np.maximum(cams[5:12], 0.7)
        cams[12:] = np.minimum(cams[12:] * 1.5, 1.0)
    else:
        raise ValueError(f"unknown CAM kind {kind!r}")
    probs = rng.random(NUM_CLASSES).astype(np.float32)
    return cams, probs, labels


def predictions_from_labels(
    labels: np.ndarray, border_width: float = 1.0, sigma: float = 1.0
) -> np.ndarray:
    """Plausible 3-channel U-Net output (uint8 softmax x 255) for a label image.

    For tests and benchmarks "with the same network outputs": border =
    pixels within ``border_width`` of a label change (between cells or to the
    background), interior = the rest of the labelled area, background = the
    rest; each channel is Gaussian-smoothed with ``sigma`` and the three are
    renormalised to sum to 1.

    Parameters
    ----------
    labels : (H, W) int
        Cells or nuclei, 0 = background.
    border_width, sigma : float
        In pixels of ``labels``.

    Returns
    -------
    (H, W, 3) uint8
        Background, border, interior.
    """
    labels = np.asarray(labels)
    edges = segmentation.find_boundaries(labels, mode="inner") & (labels > 0)
    if border_width > 1:
        dist = ndi.distance_transform_edt(~edges)
        edges = (dist < border_width) & (labels > 0)
    fg = labels > 0
    maps = np.stack([~fg, edges, fg & ~edges], axis=-1).astype(np.float32)
    if sigma > 0:
        maps = cv2.GaussianBlur(maps, (0, 0), sigma)
    maps /= np.maximum(maps.sum(axis=-1, keepdims=True), 1e-6)
    return np.rint(maps * 255.0).astype(np.uint8)


def best_match_iou(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """For every true label 1..n, its best IoU over the predicted labels.

    Computed from one contingency table of (true, predicted) label pairs, no
    per-label masks. Labels absent from ``true_labels`` (gaps in 1..n) are
    left out.

    Returns
    -------
    (k,) float64
        One value per true label present, in ascending label order; 0 for a
        true cell that no prediction touches.
    """
    t = np.asarray(true_labels, dtype=np.int64).ravel()
    p = np.asarray(pred_labels, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"label images differ in size: {np.shape(true_labels)} vs {np.shape(pred_labels)}")
    nt, npred = int(t.max(initial=0)) + 1, int(p.max(initial=0)) + 1
    table = np.bincount(t * npred + p, minlength=nt * npred).reshape(nt, npred)
    area_t = table.sum(axis=1)
    area_p = table.sum(axis=0)
    inter = table[1:, 1:].astype(np.float64)
    union = area_t[1:, None] + area_p[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    best = iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])
    return best[area_t[1:] > 0]


def label_cell_stock(nuclei_pred: np.ndarray, cell_pred: np.ndarray) -> np.ndarray:
    """hpacellseg's ``label_cell`` written out step by step with scikit-image /
    scipy calls as stock makes them (ported to scikit-image 0.26), full
    resolution only, **including** the ``uint8`` cast of the cell labels.

    A reference for tests and benchmarks, not for the pipeline: use
    :func:`label_cell` (same masks below 256 cells, any scale, faster, no wrap).
    Returns the cells (stock also returns the nuclei kept; the kernel does not use them).
    """
    from skimage.morphology import closing, remove_small_holes as sk_holes
    from skimage.morphology import remove_small_objects as sk_small

    def small(ar, min_size):  # old `min_size` (remove size < min_size) == new `max_size=min_size-1`
        return sk_small(ar, max_size=min_size - 1)

    def fill(image):
        boundaries = segmentation.find_boundaries(image)
        image = np.multiply(image, np.invert(boundaries))
        image = ndi.binary_fill_holes(image > 0)
        return ndi.label(image)[0]

    def wsh(mask_img, threshold, border_img, seeds, threshold_adjustment, small_object_size_cutoff):
        img_copy = np.copy(mask_img)
        m = seeds * border_img
        img_copy[m <= threshold + threshold_adjustment] = 0
        img_copy[m > threshold + threshold_adjustment] = 1
        img_copy = small(img_copy.astype(bool), small_object_size_cutoff).astype(np.uint8)
        mask_img[mask_img <= threshold] = 0
        mask_img[mask_img > threshold] = 1
        mask_img = sk_holes(mask_img.astype(bool), max_size=1000 - 1)
        mask_img = small(mask_img, 8).astype(np.uint8)
        markers = ndi.label(img_copy, output=np.uint32)[0]
        return segmentation.watershed(mask_img, markers, mask=mask_img, watershed_line=True)

    nuc, cell = nuclei_pred, cell_pred
    nuclei_label = wsh(
        nuc[..., 2] / 255.0, 0.4, 1 - (nuc[..., 1] + cell[..., 1]) / 255.0 > 0.05, nuc[..., 2] / 255,
        threshold_adjustment=-0.25, small_object_size_cutoff=500,
    )
    nuclei_label = small(nuclei_label, 2500)
    nuclei_label = measure.label(nuclei_label)
    threshold_value = max(0.22, filters.threshold_otsu(cell[..., 2] / 255) * 0.5)
    cell_region = np.multiply(
        cell[..., 2] / 255 > threshold_value,
        np.invert(np.asarray(cell[..., 1] / 255 > 0.05, dtype=np.int8)),
    )
    sk = np.asarray(cell_region, dtype=np.int8)
    distance = np.clip(cell[..., 2], 255 * threshold_value, cell[..., 2])
    cell_label = segmentation.watershed(-distance, nuclei_label, mask=sk)
    cell_label = small(cell_label, 5500).astype(np.uint8)  # the stock wrap
    cell_label = closing(cell_label, disk(6))
    cell_label = fill(cell_label)
    sk = np.asarray(
        np.add(np.asarray(cell_label > 0, dtype=np.int8), np.asarray(cell[..., 1] / 255 > 0.05, dtype=np.int8)) > 0,
        dtype=np.int8,
    )
    cell_label = segmentation.watershed(-distance, cell_label, mask=sk)
    cell_label = fill(cell_label)
    cell_label = np.asarray(cell_label > 0, dtype=np.uint8)
    cell_label = measure.label(cell_label)
    cell_label = small(cell_label, 5500)
    cell_label = measure.label(cell_label)
    return np.asarray(cell_label, dtype=np.uint16)  # stock then labels the nuclei kept: not needed here


def label_nuclei(nuclei_pred: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Label nuclei from the nuclei network's ``(H, W, 3)`` uint8 map alone (stock
    ``label_nuclei``), area thresholds times ``scale ** 2``; int32, nuclei 1..n. Stock compares
    the uint8 map with fractional thresholds (any non-zero value passes); here they are read
    as fractions of 255, as :func:`hpa_kernel.stages.segmentation.postprocess.label_cell` does.
    The kernel does not use it (its nuclei seed label_cell); the bench times it."""
    from hpa_kernel.stages.labels import remove_small_labels
    from hpa_kernel.stages.segmentation.postprocess import (
        BORDER_THRESHOLD, HIGH_THRESHOLD, HOLE_AREA, NUCLEUS_MIN_AREA, remove_small_holes)

    pred = np.asarray(nuclei_pred)
    area = float(scale) ** 2
    interior = pred[..., 2] / 255.0
    borders = pred[..., 1] / 255.0 > BORDER_THRESHOLD
    seeds = (interior * ~borders) > HIGH_THRESHOLD - 0.25
    seeds = ndi.binary_erosion(seeds, ndi.generate_binary_structure(2, 1), border_value=1)
    markers = measure.label(seeds)
    mask = remove_small_holes(interior > HIGH_THRESHOLD, HOLE_AREA * area)
    if markers.max() == 0:
        return np.zeros(interior.shape, np.int32)
    labels = segmentation.watershed(mask.astype(np.uint8), markers, mask=mask, watershed_line=True)
    labels = remove_small_labels(labels, NUCLEUS_MIN_AREA * area)
    return measure.label(labels).astype(np.int32)
