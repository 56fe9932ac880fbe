"""Weight-free cell segmentation (classical image processing).

Used when no hpacellseg weights are given (``docs/METHOD.md``, "Segmentation"): nuclei from the blue
channel, cells grown from them over the red + yellow signal. Every size
parameter is relative to the typical nucleus found in the image, so the same
settings work whatever the original resolution was.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.feature import peak_local_max

from hpa_kernel.config import SegmentationConfig
from hpa_kernel.stages.labels import relabel, remove_small_labels
from hpa_kernel.stages.segmentation.base import SegResult, Segmenter, register_segmenter

logger = logging.getLogger(__name__)

# RGBY channel indices
_R, _G, _B, _Y = 0, 1, 2, 3


def _smooth(channel: np.ndarray, sigma: float) -> np.ndarray:
    channel = np.ascontiguousarray(channel, dtype=np.float32)
    if sigma <= 0:
        return channel
    return cv2.GaussianBlur(channel, (0, 0), sigma)


def _otsu(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.max(initial=0.0))
    return float(filters.threshold_otsu(values))


def _has_signal(channel: np.ndarray, min_range: float) -> bool:
    lo, hi = np.percentile(channel, [1, 99.9])
    return bool(hi - lo > min_range)


def segment_nuclei(
    blue: np.ndarray,
    sigma: float = 1.0,
    min_range: float = 0.02,
    min_area_fraction: float = 0.15,
    split_fraction: float = 0.5,
    min_area: float = 12.0,
    min_contrast: float = 5.0,
) -> np.ndarray:
    """Label nuclei in the blue (DNA) channel.

    Smoothing, an Otsu threshold, hole filling, then a watershed on the
    distance transform (seeded at its maxima, at least ``split_fraction``
    nucleus radius apart) splits touching nuclei; components smaller than
    ``min_area_fraction`` of the median nucleus area are dropped.

    Parameters
    ----------
    blue : (H, W) float
        Nucleus channel in [0, 1].
    sigma : float
        Gaussian smoothing, pixels.
    min_range : float
        An image whose blue 1st-99.9th percentile range is below this has no
        nuclei (an all-black image gives none).
    min_area_fraction, split_fraction : float
        Relative to the median nucleus area / radius of this image.
    min_area : float
        Components smaller than this many pixels are noise, whatever the
        image (a nucleus of a 3072 px image is still ~100 px at 512).
    min_contrast : float
        Nuclei must be brighter than the rest by this many standard
        deviations of the rest; otherwise the image has none (pure noise).

    Returns
    -------
    (H, W) int32
        Nuclei 1..n, consecutive.
    """
    blue = np.asarray(blue, dtype=np.float32)
    empty = np.zeros(blue.shape, np.int32)
    if blue.size == 0 or not _has_signal(blue, min_range):
        return empty
    smooth = _smooth(blue, sigma)
    threshold = _otsu(smooth)
    mask = smooth > threshold
    fg, bg = smooth[mask], smooth[~mask]
    if fg.size == 0 or bg.size == 0 or fg.mean() - bg.mean() < min_contrast * max(float(bg.std()), 1e-4):
        # Otsu split of a featureless field (noise, empty well): no nuclei
        return empty
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=1))
    comps = relabel(remove_small_labels(ndi.label(mask)[0], min_area))
    n = int(comps.max())
    areas = np.bincount(comps.ravel(), minlength=n + 1)
    if n == 0:
        return empty
    areas = areas[1:]
    # typical nucleus: median of the larger components (fragments excluded)
    typical = float(np.median(areas[areas >= 0.25 * areas.max()]))
    radius = max(2.0, np.sqrt(typical / np.pi))
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    dist = _smooth(dist, max(1.0, radius / 6))
    peaks = peak_local_max(
        dist,
        min_distance=max(2, int(split_fraction * radius)),
        threshold_abs=0.3 * radius,
        labels=comps,
        exclude_border=False,
    )
    markers = np.zeros(blue.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # a component without a peak (small, flat) keeps one seed of its own
    seeded = np.zeros(n + 1, bool)
    seeded[comps[tuple(peaks.T)]] = True
    orphans = np.isin(comps, np.flatnonzero(~seeded[1:]) + 1)
    markers[orphans] = comps[orphans] + len(peaks)
    nuclei = segmentation.watershed(-dist, markers, mask=mask)
    return relabel(remove_small_labels(nuclei, min_area_fraction * typical))


def segment_classic(
    image: np.ndarray,
    sigma: float = 1.0,
    cell_sigma_fraction: float = 0.25,
    foreground_factor: float = 0.5,
    compactness: float = 0.0,
    min_cell_fraction: float = 0.5,
) -> np.ndarray:
    """Segment the cells of one RGBY image without network weights.

    Nuclei: :func:`segment_nuclei` on the blue channel. Cells: the red +
    yellow signal (plus blue, so every nucleus is inside its cell) is
    smoothed at a quarter of the nucleus radius; the foreground is where it
    exceeds ``foreground_factor`` x its Otsu threshold (holes filled); a
    watershed on the inverted smoothed signal, seeded with the nuclei and
    limited to the foreground, grows one cell per nucleus. Cells smaller
    than ``min_cell_fraction`` of their nucleus's size class are dropped.

    Parameters
    ----------
    image : (S, S, 4) float32
        RGBY in [0, 1] (any H x W works).
    sigma : float
        Smoothing of the blue channel, pixels.
    cell_sigma_fraction : float
        Smoothing of the cell signal, as a fraction of the nucleus radius.
    foreground_factor : float
        Foreground threshold = this x Otsu of the smoothed cell signal.
    compactness : float
        Compact watershed parameter (0 = plain watershed).
    min_cell_fraction : float
        Cells smaller than this x the median nucleus area are removed.

    Returns
    -------
    cells : (S, S) int32
        0 = background, cells 1..n consecutive.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 4:
        raise ValueError(f"image must be (H, W, 4) RGBY, got shape {image.shape}")
    shape = image.shape[:2]
    empty = np.zeros(shape, np.int32)
    nuclei = segment_nuclei(image[..., _B], sigma=sigma)
    n = int(nuclei.max())
    if n == 0:
        logger.debug("segment_classic: no nuclei")
        return empty
    areas = np.bincount(nuclei.ravel())[1:]
    typical = float(np.median(areas))
    radius = max(2.0, np.sqrt(typical / np.pi))

    signal = image[..., _R] + image[..., _Y]
    signal = _smooth(signal / max(float(np.percentile(signal, 99.9)), 1e-6), cell_sigma_fraction * radius)
    blue = _smooth(image[..., _B] / max(float(np.percentile(image[..., _B], 99.9)), 1e-6), sigma)
    combined = np.maximum(signal, blue)
    foreground = (signal > foreground_factor * _otsu(signal)) | (nuclei > 0)
    foreground = ndi.binary_fill_holes(foreground)
    cells = segmentation.watershed(-combined, nuclei, mask=foreground, compactness=compactness)
    # one connected piece per cell (the watershed may leave detached islands)
    cells = _keep_seeded_pieces(cells, nuclei)
    cells = relabel(remove_small_labels(cells, min_cell_fraction * typical))
    logger.debug("segment_classic: %d cells (nucleus radius %.1f px)", cells.max(), radius)
    return cells  # int32: relabel's dtype


def _keep_seeded_pieces(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Drop the parts of each cell that are not connected to its nucleus."""
    pieces = measure.label(cells, connectivity=1)
    # a piece is kept if it overlaps a nucleus of the same cell
    seeded = np.zeros(int(pieces.max()) + 1, bool)
    seeded[pieces[nuclei > 0]] = True  # the watershed keeps every seed: nuclei == cells there
    seeded[0] = False
    return np.where(seeded[pieces], cells, 0)


@register_segmenter
class ClassicSegmenter(Segmenter):
    """The weight-free segmenter (:func:`segment_classic`), one image at a time; the
    manifest's default when no segmentation weights are given."""

    name = "classic"

    def __init__(self, config: SegmentationConfig, device: Any = "cpu", fp16: bool = False) -> None:
        super().__init__(config, device, fp16)
        logger.info("segmentation: no segmentation weights given, using the weight-free classic segmenter")

    def segment(self, images: np.ndarray, orig_sizes: Sequence[tuple[int, int]]) -> list[SegResult]:
        images, _ = self.check_batch(images, orig_sizes)
        return [SegResult(segment_classic(image)) for image in images]
