"""hpacellseg post-processing (label_cell; label_nuclei: the oracle in tests/oracles.py) at scaled thresholds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hpa_kernel.stages.labels import remove_small_labels
from hpa_kernel.stages.segmentation.postprocess import (
    closing_radius,
    label_cell,
    remove_small_holes,
    scale_factors,
)
from oracles import best_match_iou, label_cell_stock, label_nuclei, predictions_from_labels


def grid_labels(n: int, pitch: int, nucleus_radius: int, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n x n touching square cells of side ``pitch`` with a disk nucleus each."""
    size = n * pitch + 2 * margin
    yy, xx = np.mgrid[:size, :size] - margin
    inside = (yy >= 0) & (xx >= 0) & (yy < n * pitch) & (xx < n * pitch)
    cells = np.where(inside, (yy // pitch) * n + (xx // pitch) + 1, 0).astype(np.int32)
    cy = (yy % pitch) - pitch / 2 + 0.5
    cx = (xx % pitch) - pitch / 2 + 0.5
    nuclei = np.where(inside & (cy**2 + cx**2 <= nucleus_radius**2), cells, 0).astype(np.int32)
    return cells, nuclei


def maps_for(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return predictions_from_labels(nuclei), predictions_from_labels(cells)


def test_grid_cells_recovered_at_512_scale() -> None:
    cells, nuclei = grid_labels(4, 100, 20, margin=20)  # 440 px, as from a 1760 px image
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    cell_lab = label_cell(nuc_pred, cell_pred, scale=0.25)
    assert cell_lab.dtype == np.int32
    assert cell_lab.shape == cells.shape
    assert sorted(np.unique(cell_lab)) == list(range(17))  # consecutive 0..16
    assert best_match_iou(cells, cell_lab).min() > 0.9


def test_area_thresholds_follow_scale() -> None:
    # one 48 x 48 cell (2304 px) with a radius-16 nucleus (~804 px)
    cells, nuclei = grid_labels(1, 48, 16, margin=30)
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    # full resolution: nucleus < 2500 and cell < 5500 px -> removed
    assert label_cell(nuc_pred, cell_pred, scale=1.0).max() == 0
    # half resolution: thresholds 625 / 1375 px -> kept
    assert label_cell(nuc_pred, cell_pred, scale=0.5).max() == 1
    assert label_cell(nuc_pred, cell_pred, scale=(0.5, 0.5)).max() == 1
    # non-square original: area factor is (S/H) * (S/W)
    sy, sx = scale_factors((512, 512), (2048, 1024))
    assert (sy, sx) == (0.5, 0.25)


def test_closing_radius_scales_with_at_least_one() -> None:
    assert closing_radius(1.0) == 6
    assert closing_radius(0.25) == 2  # 1.5 rounds up
    assert closing_radius((0.25, 0.25)) == 2
    assert closing_radius(512 / 3072) == 1
    assert closing_radius(0.01) == 1


def test_border_sum_wraps_as_in_stock() -> None:
    """QUIRK kept: nuclei border + cell border is uint8 addition (wraps)."""
    cells, nuclei = grid_labels(1, 120, 24, margin=20)
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    inside = nuclei > 0
    wrapped_n, wrapped_c = nuc_pred.copy(), cell_pred.copy()
    wrapped_n[..., 1][inside], wrapped_c[..., 1][inside] = 200, 100  # 300 -> 44: "not border"
    assert label_cell(wrapped_n, wrapped_c, scale=0.25).max() == 1
    plain_n, plain_c = nuc_pred.copy(), cell_pred.copy()
    plain_n[..., 1][inside], plain_c[..., 1][inside] = 150, 100  # 250: border, no seed
    assert label_cell(plain_n, plain_c, scale=0.25).max() == 0


def test_cell_border_channel_never_excluded_as_in_stock() -> None:
    """QUIRK kept: np.invert on int8 0/1 -> -1/-2, so border pixels stay in the cell region."""
    cells, nuclei = grid_labels(1, 120, 20, margin=20)
    nuclei = np.roll(nuclei, -30, axis=1)  # nucleus in the left half
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    # a strong border line across the cell, interior still high
    cell_pred[20:140, 79:82, 1] = 60
    cell_lab = label_cell(nuc_pred, cell_pred, scale=0.25)
    assert cell_lab.max() == 1
    assert cell_lab[80, 110] == 1  # right half, beyond the border line, is still this cell
    assert best_match_iou(cells, cell_lab)[0] > 0.9


def test_more_than_255_cells_are_not_wrapped() -> None:
    cells, nuclei = grid_labels(18, 28, 8, margin=4)  # 324 cells at 512
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    cell_lab = label_cell(nuc_pred, cell_pred, scale=0.25)
    assert cell_lab.dtype == np.int32
    assert cell_lab.max() == 324
    assert np.unique(cell_lab).size == 325
    assert np.bincount(cell_lab.ravel())[1:].min() > 300  # no label holds two cells
    assert best_match_iou(cells, cell_lab).mean() > 0.85


@pytest.mark.parametrize("fill", ["zeros", "background"])
def test_empty_maps_give_no_cells(fill: str) -> None:
    pred = np.zeros((64, 80, 3), np.uint8)
    if fill == "background":
        pred[..., 0] = 255
    cell_lab = label_cell(pred, pred, scale=0.25)
    assert cell_lab.max() == 0
    assert cell_lab.shape == (64, 80) and cell_lab.dtype == np.int32
    assert label_nuclei(pred, scale=0.25).max() == 0


def test_label_nuclei_counts_separated_nuclei() -> None:
    cells, nuclei = grid_labels(3, 100, 25, margin=10)
    nuc_lab = label_nuclei(predictions_from_labels(nuclei), scale=0.25)
    assert nuc_lab.dtype == np.int32
    assert nuc_lab.max() == 9
    assert best_match_iou(nuclei, nuc_lab).min() > 0.8


def test_fast_path_agrees_with_full_resolution_flow() -> None:
    """label_cell on 256 px maps (scaled) vs on the same maps resized to 1024 (stock)."""
    rng = np.random.default_rng(3)
    size, full = 256, 1024
    pts = rng.uniform(20, size - 20, (14, 2))
    yy, xx = np.mgrid[:size, :size]
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    cells = (np.argmin(d2, axis=-1) + 1).astype(np.int32)
    dmin = np.sqrt(d2.min(axis=-1))
    cells[dmin > 45] = 0
    nuclei = np.where(dmin < 11, cells, 0).astype(np.int32)
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    fast = label_cell(nuc_pred, cell_pred, scale=size / full)
    up = lambda a: cv2.resize(a, (full, full), interpolation=cv2.INTER_AREA)  # noqa: E731
    stock = label_cell(up(nuc_pred), up(cell_pred), scale=1.0)
    fast_full = cv2.resize(fast, (full, full), interpolation=cv2.INTER_NEAREST)
    assert fast.max() == stock.max() >= 10
    assert best_match_iou(stock, fast_full).mean() > 0.9


def voronoi_labels(rng: np.random.Generator, shape: tuple[int, int], n: int, r_cell: float, r_nuc: float):
    pts = rng.uniform(0.1, 0.9, (n, 2)) * np.array(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    dmin = np.sqrt(d2.min(axis=-1))
    cells = np.where(dmin <= r_cell, np.argmin(d2, axis=-1) + 1, 0).astype(np.int32)
    return cells, np.where(dmin <= r_nuc, cells, 0).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_same_masks_as_the_stock_call_sequence(seed: int) -> None:
    """At scale 1, label_cell == hpacellseg's label_cell written out call by call."""
    rng = np.random.default_rng(seed)
    cells, nuclei = voronoi_labels(rng, (560, 640), 9, 130, 34)
    nuc_pred = predictions_from_labels(nuclei, sigma=2.0)
    cell_pred = predictions_from_labels(cells, border_width=2.0, sigma=2.0)
    cell_pred[..., 1] = np.clip(cell_pred[..., 1].astype(int) + rng.integers(0, 30, cells.shape), 0, 255)
    ours = label_cell(nuc_pred, cell_pred, scale=1.0)
    stock = label_cell_stock(nuc_pred, cell_pred)
    assert ours.max() >= 5
    assert np.array_equal(ours, stock)


def test_float_maps_and_bad_shapes() -> None:
    cells, nuclei = grid_labels(2, 100, 20, margin=10)
    nuc_pred, cell_pred = maps_for(cells, nuclei)
    a = label_cell(nuc_pred, cell_pred, scale=0.25)
    b = label_cell(nuc_pred / 255.0, cell_pred / 255.0, scale=0.25)
    assert np.array_equal(a, b) and a.max() == 4
    with pytest.raises(ValueError):
        label_cell(nuc_pred, cell_pred[:-1], scale=0.25)
    with pytest.raises(ValueError):
        label_cell(nuc_pred[..., :2], cell_pred, scale=0.25)


def test_helpers() -> None:
    labels = np.array([[1, 1, 0, 2], [1, 1, 0, 0], [3, 0, 0, 0]], np.int32)
    assert np.array_equal(remove_small_labels(labels, 2), np.where(labels == 1, 1, 0))
    ring = np.ones((7, 7), bool)
    ring[3, 3] = False
    assert remove_small_holes(ring, 2).all()
    assert not remove_small_holes(ring, 1)[3, 3]
    pred = predictions_from_labels(np.zeros((5, 6), np.int32))
    assert pred.dtype == np.uint8 and pred.shape == (5, 6, 3) and (pred[..., 0] == 255).all()


def test_best_match_iou_contingency() -> None:
    true = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 4]], np.int32)
    pred = np.array([[5, 5, 5, 0], [5, 5, 0, 0], [0, 0, 0, 0]], np.int32)
    iou = best_match_iou(true, pred)
    assert iou.shape == (3,)  # labels 1, 2, 4 (3 absent)
    np.testing.assert_allclose(iou, [4 / 5, 1 / 8, 0.0])  # 2: 1 px shared, union 4 + 5 - 1
