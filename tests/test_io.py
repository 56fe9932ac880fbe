"""Tests for hpa_kernel.formats.images: Kaggle layout, RGBY reading and its faults, resizing, prefetch."""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np
import pytest

from hpa_kernel.formats.images import (
    CHANNELS,
    ImageReadError,
    LoadedImage,
    load_image,
    read_rgby,
    read_sample,
    read_test_set,
    resize_rgby,
)
from hpa_kernel.run.prefetch import prefetch


def _planes(h: int, w: int, dtype=np.uint8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    return [rng.integers(0, top + 1, (h, w)).astype(dtype) for _ in CHANNELS]


def _write(folder, image_id: str, planes: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for ch, p in zip(CHANNELS, planes):
        assert cv2.imwrite(str(folder / f"{image_id}_{ch}.png"), p)


# ------------------------------------------------------------------ layout


def test_read_test_set_sample_order_and_duplicates(tmp_path, caplog):
    (tmp_path / "sample_submission.csv").write_text(
        "ID,ImageWidth,ImageHeight,PredictionString\n"
        "b,2048,2048,0 1 eNoLCAgAARQA6A==\n"
        "a,1728,1728,0 1 eNoLCAgAARQA6A==\n"
        "b,2048,2048,0 1 eNoLCAgAARQA6A==\n"
        "c,,,\n"
    )
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.formats.images"):
        assert read_test_set(tmp_path)[0] == ["b", "a", "c"]
    assert "more than once" in caplog.text
    assert read_sample(tmp_path / "sample_submission.csv").sizes == {
        "b": (2048, 2048), "a": (1728, 1728), "c": (0, 0)
    }


def test_read_test_set_falls_back_to_test_folder(tmp_path, caplog):
    _write(tmp_path / "test", "zz", _planes(4, 4))
    _write(tmp_path / "test", "aa", _planes(4, 4))
    (tmp_path / "test" / "mm_red.png").write_bytes(b"")  # incomplete: kept, with a warning
    (tmp_path / "test" / "notes.txt").write_text("x")
    (tmp_path / "test" / "qq_purple.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.formats.images"):
        assert read_test_set(tmp_path)[0] == ["aa", "mm", "zz"]
    assert "lack some channel" in caplog.text


def test_read_test_set_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test images"):
        read_test_set(tmp_path)[0]
    (tmp_path / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="no test images"):
        read_test_set(tmp_path)[0]
    (tmp_path / "sample_submission.csv").write_text("ID,ImageWidth,ImageHeight,PredictionString\n")
    with pytest.raises(FileNotFoundError, match="has no IDs"):
        read_test_set(tmp_path)[0]
    (tmp_path / "sample_submission.csv").write_text("Id,Label\nx,1\n")
    with pytest.raises(ValueError, match="no 'ID' column"):
        read_test_set(tmp_path)[0]


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_read_rgby_8_and_16_bit_non_square(tmp_path, dtype):
    planes = _planes(6, 10, dtype)
    _write(tmp_path, "img", planes)
    rgby = read_rgby(tmp_path, "img")
    assert rgby.shape == (6, 10, 4) and rgby.dtype == dtype
    for i, p in enumerate(planes):
        np.testing.assert_array_equal(rgby[..., i], p)


def test_read_rgby_mixed_depth_goes_to_16_bit(tmp_path, caplog):
    planes = _planes(5, 5, np.uint16)
    planes[2] = np.full((5, 5), 255, np.uint8)
    planes[2][0, 0] = 0
    _write(tmp_path, "img", planes)
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.formats.images"):
        rgby = read_rgby(tmp_path, "img")
    assert rgby.dtype == np.uint16
    assert rgby[0, 0, 2] == 0 and rgby[1, 1, 2] == 65535
    np.testing.assert_array_equal(rgby[..., 0], planes[0])
    assert "mixed 8/16-bit" in caplog.text and "blue" in caplog.text


def test_read_rgby_colour_png_reduced_to_max_plane(tmp_path, caplog):
    planes = _planes(4, 6, np.uint8)
    green_bgr = np.zeros((4, 6, 3), np.uint8)
    green_bgr[..., 1] = planes[1]  # stain saved in the G plane only
    green_bgr[0, 0, 0] = 255  # and a bright pixel in B
    _write(tmp_path, "img", planes)
    cv2.imwrite(str(tmp_path / "img_green.png"), green_bgr)
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.formats.images"):
        rgby = read_rgby(tmp_path, "img")
    expected = planes[1].copy()
    expected[0, 0] = 255
    np.testing.assert_array_equal(rgby[..., 1], expected)
    assert "img_green.png" in caplog.text and "3-plane" in caplog.text
    # RGBA: alpha is ignored
    bgra = np.dstack([green_bgr, np.full((4, 6), 255, np.uint8)])
    cv2.imwrite(str(tmp_path / "img_green.png"), bgra)
    np.testing.assert_array_equal(read_rgby(tmp_path, "img")[..., 1], expected)


def _assert_one_line_error(folder, image_id: str, filename: str, fault: str) -> None:
    with pytest.raises(ImageReadError) as info:
        read_rgby(folder, image_id)
    msg = str(info.value)
    assert "\n" not in msg
    assert filename in msg and fault in msg, msg


def test_read_rgby_faults(tmp_path):
    planes = _planes(8, 8, np.uint16)
    _write(tmp_path, "img", planes)
    good = (tmp_path / "img_blue.png").read_bytes()

    (tmp_path / "img_yellow.png").unlink()
    _assert_one_line_error(tmp_path, "img", "img_yellow.png", "missing file")
    cv2.imwrite(str(tmp_path / "img_yellow.png"), planes[3])

    (tmp_path / "img_blue.png").write_bytes(b"")
    _assert_one_line_error(tmp_path, "img", "img_blue.png", "empty (0-byte)")

    (tmp_path / "img_blue.png").write_bytes(good[: len(good) // 2])
    _assert_one_line_error(tmp_path, "img", "img_blue.png", "cannot decode")

    (tmp_path / "img_blue.png").write_bytes(b"this is not a png at all")
    _assert_one_line_error(tmp_path, "img", "img_blue.png", "not a PNG file")

    (tmp_path / "img_blue.png").write_bytes(good)
    cv2.imwrite(str(tmp_path / "img_green.png"), planes[1][:, :6])
    _assert_one_line_error(tmp_path, "img", "img_green.png", "size 6x8 differs")


def test_resize_rgby_scales_and_stretches():
    u8 = np.full((6, 10, 4), 255, np.uint8)
    u8[..., 1] = 0
    out = resize_rgby(u8, 4)
    assert out.shape == (4, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], 1.0)
    np.testing.assert_allclose(out[..., 1], 0.0)
    u16 = np.full((8, 8, 4), 65535, np.uint16)
    u16[:4] = 0  # top half black: INTER_AREA averages 2x2 blocks exactly
    out = resize_rgby(u16, 4)
    np.testing.assert_allclose(out[:2], 0.0)
    np.testing.assert_allclose(out[2:], 1.0)
    # same size: conversion only
    x = np.arange(64, dtype=np.uint8).reshape(4, 4, 4)
    np.testing.assert_allclose(resize_rgby(x, 4), x / 255.0, rtol=1e-6)
    with pytest.raises(ValueError):
        resize_rgby(np.zeros((4, 4, 3), np.uint8), 4)
    with pytest.raises(ValueError):
        resize_rgby(np.zeros((4, 4, 4), np.float32), 4)


def test_load_image_never_raises(tmp_path):
    _write(tmp_path, "ok", _planes(12, 20, np.uint16))
    loaded = load_image(tmp_path, "ok", size=8)
    assert isinstance(loaded, LoadedImage) and loaded.ok
    assert (loaded.width, loaded.height) == (20, 12)
    assert loaded.image.shape == (8, 8, 4) and loaded.image.dtype == np.float32
    assert 0.0 <= loaded.image.min() and loaded.image.max() <= 1.0

    bad = load_image(tmp_path, "nope", size=8)
    assert not bad.ok and bad.image is None and (bad.width, bad.height) == (0, 0)
    assert "nope_red.png" in bad.error and "missing file" in bad.error

    worse = load_image(tmp_path, "ok", size=0)  # a ValueError from resize is caught too
    assert not worse.ok and "ok:" in worse.error and "ValueError" in worse.error


# ------------------------------------------------------------------ prefetch


def test_prefetch_keeps_order():
    def slow(i: int) -> int:
        time.sleep(0.002 * ((7 * i) % 5))
        return i * i

    assert list(prefetch(range(20), slow, workers=3, ahead=5)) == [i * i for i in range(20)]
    assert list(prefetch(range(5), slow, workers=0)) == [i * i for i in range(5)]
    assert list(prefetch([], slow)) == []


def test_prefetch_runs_items_concurrently():
    barrier = threading.Barrier(2, timeout=5)

    def meet(i: int) -> int:
        barrier.wait()  # raises BrokenBarrierError unless two items run at the same time
        return i

    assert list(prefetch(range(4), meet, workers=2, ahead=2)) == [0, 1, 2, 3]


def test_prefetch_lookahead_is_bounded():
    lock = threading.Lock()
    started: list[int] = []

    def record(i: int) -> int:
        with lock:
            started.append(i)
        return i

    consumed = 0
    for value in prefetch(iter(range(30)), record, workers=2, ahead=3):
        time.sleep(0.002)  # let the pool run as far ahead as it may
        with lock:
            assert max(started) <= value + 3
        consumed += 1
    assert consumed == 30


def test_prefetch_exception_at_its_turn():
    def boom(i: int) -> int:
        if i == 3:
            raise KeyError("item 3")
        return i

    got = []
    with pytest.raises(KeyError, match="item 3"):
        for v in prefetch(range(10), boom, workers=2, ahead=4):
            got.append(v)
    assert got == [0, 1, 2]


def test_prefetch_early_close_stops_work():
    lock = threading.Lock()
    started: list[int] = []

    def record(i: int) -> int:
        with lock:
            started.append(i)
        return i

    gen = prefetch(iter(range(1000)), record, workers=2, ahead=4)
    assert next(gen) == 0
    gen.close()
    assert len(started) <= 6


def test_prefetch_rejects_bad_arguments():
    with pytest.raises(ValueError):
        list(prefetch(range(3), abs, ahead=0))
    with pytest.raises(ValueError):
        list(prefetch(range(3), abs, workers=-1))
