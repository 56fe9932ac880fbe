"""hpacellseg post-processing (``label_cell``) at any scale.

The stock hpacellseg package turns the two U-Nets' 3-channel softmax maps
(background, border/touching, interior; ``uint8`` = probability x 255) into
label images with a fixed chain of morphology tuned on full-resolution
(2048 px) Human Protein Atlas images. This module reproduces that chain with
every area threshold multiplied by the *area factor* ``sy * sx`` and the
closing disk radius by its square root, where ``(sy, sx)`` is the linear
scale of the maps relative to the original image. ``scale=1`` is the stock
full-resolution flow; ``scale=512 / 2048`` runs the same chain on maps at
512 px (the fast path, ``docs/METHOD.md``, "Segmentation").

Two stock quirks that shape the masks are kept on purpose (the network
weights were tuned together with them); each is marked ``QUIRK`` below.
``tests/oracles.py`` has the stock function written out call by call
(``label_cell_stock``); at scale 1 (below 256 cells) :func:`label_cell` gives the
same label images.

* the border term ``nuc[..., 1] + cell[..., 1]`` is a ``uint8`` addition
  that wraps around 256;
* ``np.invert`` on an ``int8`` 0/1 array gives -1/-2, both non-zero, so the
  cell-border channel never really removes anything from the cell region;
* ``np.clip(x, 255 * threshold, x)`` (upper bound = ``x``) is a no-op, so the
  watershed landscape is the raw cell-interior map.

One stock behaviour is a plain bug and is *not* reproduced: stock casts the
cell labels to ``uint8`` after the first watershed, which wraps (and drops
cell 256, 512, ...) above 255 cells. Labels here are ``int32`` throughout.

Objects are removed with "size < threshold" semantics (the old scikit-image
``min_size``) implemented with ``np.bincount``, which keeps fractional scaled
thresholds exact and avoids the ``min_size`` / ``max_size`` API change of
scikit-image 0.26.
"""

from __future__ import annotations

import logging
from typing import Union

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.morphology import disk

from hpa_kernel.stages.labels import relabel, remove_small_labels

logger = logging.getLogger(__name__)

Scale = Union[float, tuple[float, float]]

#: Stock thresholds, in pixels at the original (full) resolution.
NUCLEI_SEED_MIN_AREA = 500  # seeds of the nuclei watershed
HOLE_AREA = 1000  # remove_small_holes on the nuclei mask
MASK_MIN_AREA = 8  # remove_small_objects on the nuclei mask
NUCLEUS_MIN_AREA = 2500  # final nuclei
CELL_MIN_AREA = 5500  # cells
CLOSING_RADIUS = 6  # disk(6) closing of the cell labels

#: Stock probability thresholds (fractions of 255).
HIGH_THRESHOLD = 0.4
SEED_ADJUSTMENT = -0.25  # label_cell's nuclei seeds: interior > 0.4 - 0.25
BORDER_THRESHOLD = 0.05


def scale_factors(shape: tuple[int, int], orig_size: tuple[int, int]) -> tuple[float, float]:
    """Linear scale ``(sy, sx)`` of maps of ``shape`` (rows, cols) relative to
    an original image of ``orig_size`` = ``(width, height)``."""
    width, height = orig_size
    return shape[0] / float(height), shape[1] / float(width)


def _area_factor(scale: Scale) -> float:
    if np.ndim(scale) == 0:
        s = float(scale)
        return s * s
    sy, sx = scale
    return float(sy) * float(sx)


def closing_radius(scale: Scale) -> int:
    """Radius of the closing disk at ``scale``: ``6 * sqrt(sy * sx)``, rounded, at least 1."""
    return max(1, int(np.floor(CLOSING_RADIUS * np.sqrt(_area_factor(scale)) + 0.5)))


def remove_small_components(mask: np.ndarray, min_area: float, connectivity: int = 1) -> np.ndarray:
    """Boolean ``mask`` without its connected components smaller than ``min_area``."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 1 or not mask.any():
        return mask
    structure = ndi.generate_binary_structure(mask.ndim, connectivity)
    labels, _ = ndi.label(mask, structure=structure)
    return remove_small_labels(labels, min_area) > 0


def remove_small_holes(mask: np.ndarray, area: float, connectivity: int = 1) -> np.ndarray:
    """Fill background components smaller than ``area`` (as scikit-image: the
    components of ``~mask``, including those touching the image edge)."""
    mask = np.asarray(mask, dtype=bool)
    return ~remove_small_components(~mask, area, connectivity)


def thick_boundaries(labels: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.find_boundaries(labels)`` (mode "thick",
    connectivity 1): pixels with a 4-neighbour of another label; the image
    edge is no boundary. Done with array shifts (several times faster)."""
    b = np.zeros(labels.shape, bool)
    dy = labels[1:] != labels[:-1]
    b[1:] |= dy
    b[:-1] |= dy
    dx = labels[:, 1:] != labels[:, :-1]
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (4-connected background): fill the
    background components that do not touch the image edge. One labelling
    instead of scipy's iterated dilations (whose cost grows with the image
    side)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or min(mask.shape) < 3:
        return ndi.binary_fill_holes(mask)
    bg, n = ndi.label(~mask)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 = the mask itself
    return ~outside[bg] | mask


def _fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Stock ``__fill_holes``: cut every label along its (thick) boundary,
    fill holes of the foreground and relabel 4-connected components."""
    filled = fill_holes((labels > 0) & ~thick_boundaries(labels))
    return ndi.label(filled)[0]


def _grey_closing(labels: np.ndarray, radius: int) -> np.ndarray:
    """Grey-level closing of a label image with ``disk(radius)``, reflect border
    (as ``skimage.morphology.closing``), via OpenCV on float32 (exact < 2**24)."""
    if labels.max(initial=0) >= 2**24:  # pragma: no cover - absurd cell counts
        from skimage.morphology import closing

        return closing(labels, disk(radius))
    kernel = disk(radius).astype(np.uint8)
    out = cv2.morphologyEx(
        labels.astype(np.float32), cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REFLECT
    )
    return out.astype(labels.dtype)


def _check_pred(pred: np.ndarray, name: str) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[-1] != 3:
        raise ValueError(f"{name} must be (H, W, 3), got shape {pred.shape}")
    if pred.dtype != np.uint8:
        if np.issubdtype(pred.dtype, np.floating) and pred.size and pred.max() <= 1.0:
            pred = np.rint(pred * 255.0)
        pred = np.clip(pred, 0, 255).astype(np.uint8)
    return pred


def _seeded_nuclei(
    interior: np.ndarray, not_border: np.ndarray, area: float
) -> np.ndarray:
    """Stock ``__wsh`` as ``label_cell`` calls it: seeds = interior x not_border
    > 0.15 (small ones removed), mask = interior > 0.4 (holes filled), watershed
    with lines between touching nuclei."""
    seeds = (interior * not_border) > HIGH_THRESHOLD + SEED_ADJUSTMENT
    seeds = remove_small_components(seeds, NUCLEI_SEED_MIN_AREA * area)
    mask = interior > HIGH_THRESHOLD
    mask = remove_small_holes(mask, HOLE_AREA * area)
    mask = remove_small_components(mask, MASK_MIN_AREA * area)
    markers = ndi.label(seeds)[0]
    if markers.max() == 0:
        return np.zeros(interior.shape, np.int32)
    mask_u8 = mask.astype(np.uint8)
    return segmentation.watershed(mask_u8, markers, mask=mask, watershed_line=True)


def label_cell(
    nuclei_pred: np.ndarray, cell_pred: np.ndarray, scale: Scale = 1.0
) -> np.ndarray:
    """Label cells (stock hpacellseg ``label_cell``; its nuclei are only the cells' seeds here).

    Parameters
    ----------
    nuclei_pred, cell_pred : (H, W, 3) uint8
        Softmax x 255 of the nuclei and cell U-Nets (background, border,
        interior), same size. Float maps in [0, 1] are converted.
    scale : float or (sy, sx)
        Linear scale of the maps relative to the original image (use
        :func:`scale_factors`). Every area threshold is multiplied by
        ``sy * sx`` and the closing radius 6 by ``sqrt(sy * sx)`` (at least 1).

    Returns
    -------
    cells : (H, W) int32
        0 = background, cells 1..n (consecutive, never wrapped).
    """
    nuc = _check_pred(nuclei_pred, "nuclei_pred")
    cell = _check_pred(cell_pred, "cell_pred")
    if nuc.shape != cell.shape:
        raise ValueError(f"nuclei_pred {nuc.shape} and cell_pred {cell.shape} differ in shape")
    area = _area_factor(scale)
    empty = np.zeros(nuc.shape[:2], np.int32)

    # QUIRK (kept on purpose): uint8 + uint8 wraps around 256, so where both
    # border maps are strong the sum is small and the pixel counts as
    # "not border" -- the stock masks (and the weights) were made this way.
    border_sum = nuc[..., 1] + cell[..., 1]
    not_border = 1 - border_sum / 255.0 > BORDER_THRESHOLD
    nuclei = _seeded_nuclei(nuc[..., 2] / 255.0, not_border, area)
    nuclei = remove_small_labels(nuclei, NUCLEUS_MIN_AREA * area)
    nuclei = measure.label(nuclei)
    if nuclei.max() == 0:
        return empty

    cell_interior = cell[..., 2] / 255.0
    threshold = max(0.22, float(filters.threshold_otsu(cell_interior)) * 0.5)
    # QUIRK (kept on purpose): stock's np.invert(int8 border) is -1/-2, never 0: border pixels stay in.
    region = cell_interior > threshold
    # QUIRK (kept on purpose): stock writes np.clip(x, 255 * threshold, x);
    # with the upper bound = x itself the clip is a no-op, so the watershed
    # landscape is the raw cell-interior map (it matters in the second
    # watershed, where the mask reaches below the threshold).
    distance = cell[..., 2].astype(np.float64)
    cells = segmentation.watershed(-distance, nuclei, mask=region)
    # Stock casts to uint8 here (wraps above 255 cells): a bug, not reproduced.
    cells = remove_small_labels(cells, CELL_MIN_AREA * area)
    cells = _grey_closing(cells, closing_radius(scale))
    cells = _fill_label_holes(cells)
    # Second watershed: let cells grow into the border channel (cells clear on
    # the border but without a nucleus stay out: they have no seed).
    grow = (cells > 0) | (cell[..., 1] / 255.0 > BORDER_THRESHOLD)
    cells = segmentation.watershed(-distance, cells, mask=grow)
    cells = _fill_label_holes(cells)
    cells = measure.label(cells > 0)
    cells = remove_small_labels(cells, CELL_MIN_AREA * area)
    cells = relabel(cells)
    logger.debug("label_cell: %d cells at %s (area factor %.4f)", cells.max(), cells.shape, area)
    return cells
