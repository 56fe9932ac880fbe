"""Weight-free segmenter on synthetic HPA-like images."""

from __future__ import annotations

import importlib

import cv2
import numpy as np
import pytest

from hpa_kernel.stages.segmentation.classic import segment_classic, segment_nuclei
from oracles import best_match_iou

S = 512


def to_512(rgby: np.ndarray) -> np.ndarray:
    """The pipeline's 512 image (``io.resize_rgby``; cv2 INTER_AREA until io lands)."""
    try:
        from hpa_kernel.formats.images import resize_rgby
    except ImportError:  # io.py not there yet: the same contract, done here
        scale = 255.0 if rgby.dtype == np.uint8 else 65535.0
        return cv2.resize(rgby.astype(np.float32) / scale, (S, S), interpolation=cv2.INTER_AREA)
    return resize_rgby(rgby, S)


def labels_to_512(labels: np.ndarray) -> np.ndarray:
    return cv2.resize(labels, (S, S), interpolation=cv2.INTER_NEAREST)


@pytest.mark.parametrize(
    "seed, height, width, depth",
    [(0, 1024, 1024, 8), (7, 2048, 2048, 16), (5, 1024, 1536, 8), (2, 2048, 1536, 8)],
)
def test_synthetic_mean_best_match_iou(seed: int, height: int, width: int, depth: int) -> None:
    synthetic = importlib.import_module("hpa_kernel.tools.synthetic")
    im = synthetic.make_image(np.random.default_rng(seed), height, width, depth=depth)
    cells = segment_classic(to_512(im.rgby))
    truth = labels_to_512(im.cell_labels)
    assert cells.shape == (S, S) and cells.dtype == np.int32
    iou = best_match_iou(truth, cells)
    assert iou.size == np.unique(truth[truth > 0]).size
    assert iou.mean() >= 0.8, f"mean best-match IoU {iou.mean():.3f}"
    n_true = int(truth.max())
    assert abs(int(cells.max()) - n_true) <= max(2, n_true // 8)


def blob_image(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Six round cells (red/yellow) with a nucleus each (blue), two pairs touching."""
    centres = [(60, 60), (60, 118), (180, 70), (180, 190), (70, 200), (128, 128)]
    yy, xx = np.mgrid[:size, :size]
    d2 = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres])
    owner = np.argmin(d2, axis=0) + 1
    dmin = d2.min(axis=0)
    cells = np.where(dmin <= 30**2, owner, 0).astype(np.int32)
    nucleus = dmin <= 11**2
    image = np.zeros((size, size, 4), np.float32)
    image[..., 0] = 0.5 * (cells > 0) * (1 - 0.5 * np.sqrt(dmin) / 30)
    image[..., 3] = 0.4 * (cells > 0)
    image[..., 2] = 0.8 * nucleus
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    image += np.random.default_rng(0).normal(0, 0.01, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), cells


def test_blob_cells_one_per_nucleus() -> None:
    image, truth = blob_image()
    cells = segment_classic(image)
    assert cells.max() == 6
    assert np.array_equal(np.unique(cells), np.arange(7))  # consecutive
    assert best_match_iou(truth, cells).min() > 0.8


def test_touching_nuclei_are_split() -> None:
    yy, xx = np.mgrid[:128, :128]
    blue = ((yy - 64) ** 2 + (xx - 50) ** 2 <= 14**2) | ((yy - 64) ** 2 + (xx - 76) ** 2 <= 14**2)
    nuclei = segment_nuclei(cv2.GaussianBlur(blue.astype(np.float32), (0, 0), 1.0))
    assert nuclei.max() == 2


@pytest.mark.parametrize("kind", ["black", "noise", "constant", "tiny"])
def test_featureless_images_give_no_cells(kind: str) -> None:
    rng = np.random.default_rng(1)
    image = {
        "black": np.zeros((S, S, 4), np.float32),
        "noise": np.clip(0.03 + 0.01 * rng.standard_normal((S, S, 4)), 0, 1).astype(np.float32),
        "constant": np.full((64, 64, 4), 0.5, np.float32),
        "tiny": np.zeros((3, 5, 4), np.float32),
    }[kind]
    cells = segment_classic(image)
    assert cells.shape == image.shape[:2] and cells.dtype == np.int32
    assert cells.max() == 0


def test_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        segment_classic(np.zeros((32, 32, 3), np.float32))
