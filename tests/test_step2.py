"""Step 2: square crops (geometry) and batched crop prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpa_kernel.stages.model import RGBY_MEAN, RGBY_STD, PuzzleCAM, normalize
from hpa_kernel.stages.step2 import crop_cells, predict_crops, square_boxes


def test_square_boxes_centered():
    sq = square_boxes(np.array([[2, 3, 5, 9], [0, 0, 4, 1]]))
    np.testing.assert_array_equal(sq, [[1, 3, 7, 9], [0, -1, 4, 3]])  # odd extra goes after
    assert np.all(sq[:, 2] - sq[:, 0] == sq[:, 3] - sq[:, 1])


def test_corner_cell_is_zero_padded_and_centered():
    # a 4 x 2 cell in the top-left corner: its square reaches one column beyond the image
    S = 16
    image = np.zeros((S, S, 4), np.float32)
    lab = np.zeros((S, S), np.int32)
    lab[0:4, 0:2] = 1
    image[0:4, 0:2] = np.arange(1, 5, dtype=np.float32) / 10  # channel c = (c+1)/10
    crops = crop_cells(image, lab, np.array([1]), crop_size=4)
    assert crops.shape == (1, 4, 4, 4) and crops.dtype == np.float32
    # square = rows 0..3, cols -1..2: column 0 (beyond the image) and column 3 are zeros
    for c in range(4):
        np.testing.assert_allclose(crops[0, c, :, 0], 0)
        np.testing.assert_allclose(crops[0, c, :, 3], 0)
        np.testing.assert_allclose(crops[0, c, :, 1:3], (c + 1) / 10, rtol=1e-6)


def test_crop_content_is_centred_and_scaled():
    S = 64
    image = np.zeros((S, S, 4), np.float32)
    lab = np.zeros((S, S), np.int32)
    lab[20:30, 10:50] = 7  # 10 x 40 box -> square 40 x 40, rows 5..45
    image[20:30, 10:50, 1] = 1.0
    crops = crop_cells(image, lab, np.array([7]), crop_size=80)
    g = crops[0, 1]
    rows = np.flatnonzero(g.max(axis=1) > 0.5)
    cols = np.flatnonzero(g.max(axis=0) > 0.5)
    assert rows.min() == pytest.approx(30, abs=1) and rows.max() == pytest.approx(49, abs=1)  # (15..25)*2
    assert cols.min() == 0 and cols.max() == 79
    assert crops[0, 0].max() == 0 and crops[0, 2].max() == 0


def test_empty_cells_give_zero_crops_and_neighbours_are_kept():
    S = 32
    rng = np.random.default_rng(0)
    image = rng.random((S, S, 4), dtype=np.float32)
    lab = np.zeros((S, S), np.int32)
    lab[4:20, 4:20] = 1
    lab[10:16, 16:28] = 2  # overlaps cell 1's square
    crops = crop_cells(image, lab, np.array([1, 5]), crop_size=16)
    assert np.all(crops[1] == 0)  # absent id: zeros
    # the crop is the image inside the (already square, 16 px) box: the neighbour's pixels are kept
    np.testing.assert_allclose(crops[0], image[4:20, 4:20].transpose(2, 0, 1), atol=1e-6)


def test_shrinking_large_cells_uses_area():
    S = 64
    image = np.zeros((S, S, 4), np.float32)
    image[::2, :, 0] = 1.0  # stripes: area averaging gives 0.5 everywhere
    lab = np.ones((S, S), np.int32)
    crop = crop_cells(image, lab, np.array([1]), crop_size=16)[0, 0]
    np.testing.assert_allclose(crop, 0.5, atol=1e-6)


@pytest.fixture(scope="module")
def model() -> PuzzleCAM:
    torch.manual_seed(0)
    return PuzzleCAM("resnet10t").eval()


def test_predict_crops_batching_invariance_and_normalisation(model):
    rng = np.random.default_rng(1)
    crops = rng.random((7, 4, 32, 32), dtype=np.float32)
    p1 = predict_crops(model, crops, batch_size=1)
    p7 = predict_crops(model, crops, batch_size=7)
    p3 = predict_crops(model, crops, batch_size=3)
    assert p1.shape == (7, 19) and p1.dtype == np.float32
    np.testing.assert_allclose(p1, p7, atol=1e-5)
    np.testing.assert_allclose(p1, p3, atol=1e-5)
    with torch.no_grad():
        expected = torch.sigmoid(model(normalize(torch.from_numpy(crops), RGBY_MEAN, RGBY_STD))).numpy()
    np.testing.assert_allclose(p7, expected, atol=1e-5)
    assert np.all((p1 > 0) & (p1 < 1))
    other = predict_crops(model, crops, mean=(0.5,) * 4, std=(0.1,) * 4)
    assert not np.allclose(other, p1, atol=1e-3)


def test_predict_crops_uses_meta_normalisation_and_handles_zero_cells(model):
    rng = np.random.default_rng(2)
    crops = rng.random((2, 4, 32, 32), dtype=np.float32)
    explicit = predict_crops(model, crops, mean=(0.5,) * 4, std=(0.1,) * 4)
    model.meta = {"mean": [0.5] * 4, "std": [0.1] * 4}
    try:
        np.testing.assert_allclose(predict_crops(model, crops), explicit, atol=1e-6)
    finally:
        model.meta = {}
    empty = predict_crops(model, np.zeros((0, 4, 32, 32), np.float32))
    assert empty.shape == (0, 19)
    with pytest.raises(ValueError):
        predict_crops(model, crops, batch_size=0)
    # fp16 requested on CPU: ignored (autocast only on CUDA)
    np.testing.assert_allclose(predict_crops(model, crops, fp16=True), predict_crops(model, crops), atol=1e-6)
