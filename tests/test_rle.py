"""Tests for hpa_kernel.formats.rle: one-mask codec, all-cells encoder, string checker."""

from __future__ import annotations

import base64
import zlib

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from hpa_kernel.formats.rle import (
    check_masks,
    decode_mask,
    encode_label_image,
    encode_mask,
)
from hpa_kernel.stages.labels import resize_labels


def _coco_decode(text: str, h: int, w: int) -> np.ndarray:
    """pycocotools' own decoder, independent of decode_mask."""
    counts = zlib.decompress(base64.b64decode(text))
    return mask_util.decode({"size": [h, w], "counts": counts}).astype(bool)


def _blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """A small int32 label image: n rectangles of random size (later ones overwrite)."""
    lab = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y : y + rng.integers(1, h // 2 + 2), x : x + rng.integers(1, w // 2 + 2)] = k
    return lab


def _assert_matches_per_cell(labels: np.ndarray, width: int, height: int, **kw) -> dict[int, str]:
    out = encode_label_image(labels, width, height, **kw)
    resized = cv2.resize(labels.astype(np.int32), (width, height), interpolation=cv2.INTER_NEAREST)
    for cid, text in out.items():
        assert text == encode_mask(resized == cid), f"cell {cid}"
    return out


# ------------------------------------------------------------------ encode/decode one mask


def test_encode_decode_roundtrip_against_pycocotools():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (1, 7), (7, 1), (13, 29), (64, 48)]:
        m = rng.random((h, w)) < 0.3
        text = encode_mask(m)
        np.testing.assert_array_equal(decode_mask(text, h, w), m)
        np.testing.assert_array_equal(_coco_decode(text, h, w), m)
        assert decode_mask(text, h, w).dtype == bool


def test_encode_known_string():
    # hand-checked: counts [0, 1, 16, 2, 3, 2, 10, 1] for this 5x7 mask
    m = np.zeros((5, 7), np.uint8)
    m[0, 0] = 1
    m[2:4, 3:5] = 1
    m[4, 6] = 1
    rle = mask_util.frPyObjects({"size": [5, 7], "counts": [0, 1, 16, 2, 3, 2, 10, 1]}, 5, 7)
    assert encode_mask(m) == base64.b64encode(zlib.compress(rle["counts"], 9)).decode()


def test_encode_mask_treats_nonzero_as_inside():
    m = np.array([[0, 2], [-1, 0]], np.int32)
    assert encode_mask(m) == encode_mask(m != 0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("not base64!!", "base64"),
        (base64.b64encode(b"plain bytes").decode(), "zlib"),
        (base64.b64encode(zlib.compress(b"")).decode(), "empty RLE"),
        (base64.b64encode(zlib.compress(b"0\x01")).decode(), "character"),
        (base64.b64encode(zlib.compress(b"0l")).decode(), "truncated"),
        (base64.b64encode(zlib.compress(b"0jjjjjjj1")).decode(), "too long"),
        (base64.b64encode(zlib.compress(b"60")).decode(), "cover 6 pixels"),
    ],
)
def test_decode_mask_rejects_bad_strings(text, match):
    with pytest.raises(ValueError, match=match):
        decode_mask(text, 2, 2)


def test_decode_mask_rejects_wrong_size_and_bad_args():
    text = encode_mask(np.ones((4, 6), bool))
    with pytest.raises(ValueError, match="cover 24 pixels, expected 6x5=30"):
        decode_mask(text, 6, 5)
    with pytest.raises(ValueError, match="positive"):
        decode_mask(text, 0, 24)
    with pytest.raises(ValueError, match="must be str"):
        decode_mask(None, 4, 6)  # type: ignore[arg-type]


def test_decode_mask_rejects_negative_run():
    # values [0, 3, 3, -5]: the 4th is a delta to the 2nd, so the run is 3 - 5 = -2; the
    # runs still sum to 4 = 2x2, so only the negative-run check can catch it.
    text = base64.b64encode(zlib.compress(b"033K")).decode()
    with pytest.raises(ValueError, match="negative"):
        decode_mask(text, 2, 2)


# ------------------------------------------------------------------ all cells at once


@pytest.mark.parametrize("size", [(16, 16, 64, 64), (12, 20, 37, 23), (30, 10, 11, 7), (9, 9, 9, 9)])
def test_encode_label_image_matches_per_cell_encode(size):
    h, w, out_w, out_h = size
    rng = np.random.default_rng(h * 100 + w)
    lab = _blobs(rng, h, w, 7)
    out = _assert_matches_per_cell(lab, out_w, out_h)
    present = np.unique(cv2.resize(lab, (out_w, out_h), interpolation=cv2.INTER_NEAREST))
    assert list(out) == [int(v) for v in present if v != 0]


def test_encode_label_image_border_first_and_last_pixel():
    lab = np.zeros((8, 12), np.int32)
    lab[0, 0] = 1  # first pixel
    lab[-1, -1] = 2  # last pixel
    lab[:, 5] = 3  # touches top and bottom
    lab[3, :] = 4  # touches left and right (overwrites part of 3)
    lab[5:7, 8:11] = 5  # an interior block
    out = _assert_matches_per_cell(lab, 12, 8)
    assert set(out) == {1, 2, 3, 4, 5}
    out = _assert_matches_per_cell(lab, 31, 19)
    assert set(out) == {1, 2, 3, 4, 5}
    for cid, text in out.items():
        resized = resize_labels(lab, 31, 19)
        np.testing.assert_array_equal(_coco_decode(text, 19, 31), resized == cid)


def test_encode_label_image_whole_image_one_cell():
    lab = np.full((4, 5), 7, np.int32)
    out = _assert_matches_per_cell(lab, 10, 8)
    assert list(out) == [7]
    assert decode_mask(out[7], 8, 10).all()


def test_encode_label_image_empty_and_absent():
    lab = np.zeros((6, 6), np.int32)
    assert encode_label_image(lab, 12, 12) == {}
    lab[1:3, 1:3] = 2
    # 5 is absent: left out (an empty mask is no detection)
    assert list(encode_label_image(lab, 12, 12, cell_ids=[2, 5])) == [2]
    out = _assert_matches_per_cell(lab, 12, 12, cell_ids=[5, 2])
    assert list(out) == [2]


def test_encode_label_image_subset_of_cells():
    rng = np.random.default_rng(3)
    lab = _blobs(rng, 20, 20, 6)
    present = [int(v) for v in np.unique(lab) if v]
    subset = np.array(present[::2])
    out = _assert_matches_per_cell(lab, 50, 40, cell_ids=subset)
    assert list(out) == sorted(subset.tolist())


def test_encode_label_image_large_labels():
    lab = np.zeros((10, 10), np.int64)
    lab[:3, :3] = 300
    lab[5:, 5:] = 70_000  # > uint16
    lab[0, 9] = 2**31 - 1
    out = _assert_matches_per_cell(lab, 25, 25)
    assert list(out) == [300, 70_000, 2**31 - 1]
    with pytest.raises(ValueError, match="int32"):
        encode_label_image(np.full((2, 2), 2**31, np.int64), 4, 4)


def test_encode_label_image_downscaling_drops_tiny_cells():
    lab = np.zeros((20, 20), np.int32)
    lab[1, 1] = 1  # lost when halving with nearest (odd row/col)
    lab[4:10, 4:10] = 2
    out = _assert_matches_per_cell(lab, 10, 10)
    assert list(out) == [2]


def test_encode_label_image_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        encode_label_image(np.zeros((2, 2, 2), np.int32), 4, 4)
    with pytest.raises(ValueError, match="negative"):
        encode_label_image(np.full((2, 2), -1, np.int32), 4, 4)
    with pytest.raises(ValueError, match="integer"):
        encode_label_image(np.zeros((2, 2), np.float32), 4, 4)
    with pytest.raises(ValueError, match="positive"):
        encode_label_image(np.zeros((2, 2), np.int32), 0, 4)
    with pytest.raises(ValueError, match="positive"):
        encode_label_image(np.ones((2, 2), np.int32), 4, 4, cell_ids=[0, 1])


# ------------------------------------------------------------------ many strings at once


def test_check_masks_areas_and_errors():
    rng = np.random.default_rng(5)
    masks = [rng.random((9, 11)) < p for p in (0.0, 0.1, 0.5, 1.0)]
    texts = [encode_mask(m) for m in masks]
    areas, errors = check_masks(texts, 9, 11)
    assert errors == [None] * 4
    np.testing.assert_array_equal(areas, [m.sum() for m in masks])

    texts2 = texts + ["%%%", texts[1], texts[2]]
    areas, errors = check_masks(texts2, [9] * 4 + [9, 9, 10], [11] * 4 + [11, 12, 11])
    assert errors[:4] == [None] * 4
    assert "base64" in errors[4]
    assert "cover 99 pixels" in errors[5] and "cover 99 pixels" in errors[6]
    np.testing.assert_array_equal(areas[4:], 0)
    assert check_masks([], 1, 1)[1] == []


def test_check_masks_many_random_strings_agree_with_pycocotools():
    rng = np.random.default_rng(11)
    texts, sizes, truth = [], [], []
    for _ in range(60):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        texts.append(encode_mask(m))
        sizes.append((h, w))
        truth.append(int(m.sum()))
    areas, errors = check_masks(texts, [s[0] for s in sizes], [s[1] for s in sizes])
    assert errors == [None] * 60
    np.testing.assert_array_equal(areas, truth)
