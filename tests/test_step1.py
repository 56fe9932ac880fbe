"""Step 1 (CAM ∩ cells): hand-made cases with known answers, and the vectorised code
against the straightforward reference (tests/oracles.py) on random inputs, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpa_kernel.classes import NEGATIVE
from hpa_kernel.stages.labels import present_ids
from hpa_kernel.stages.step1 import grouped_quantiles, step1_scores

import oracles
from oracles import step1_scores_reference as reference


def two_cells(size: int = 10) -> np.ndarray:
    """Cell 1 = left half, cell 2 = right half."""
    labels = np.zeros((size, size), dtype=np.int32)
    labels[:, : size // 2] = 1
    labels[:, size // 2 :] = 2
    return labels


def base_probs(value: float = 0.005) -> np.ndarray:
    return np.full(19, value, dtype=np.float32)


def cams_zero(size: int = 10) -> np.ndarray:
    return np.zeros((19, size, size), dtype=np.float32)


def test_cam_on_one_cell_gives_it_p_and_the_other_negative():
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    cams[3, :, :5] = 1.0
    probs[3] = 0.8
    s = step1_scores(cams, probs, labels)
    expected = np.zeros((2, 19), np.float32)
    expected[0, 3] = 0.8
    expected[1, NEGATIVE] = probs[NEGATIVE]
    np.testing.assert_allclose(s, expected, atol=1e-7)
    np.testing.assert_allclose(reference(cams, probs, labels), expected, atol=1e-7)


def test_conf_is_quantile_ratio_times_p():
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    cams[3, :, :5] = 1.0
    cams[3, :, 5:] = np.linspace(0.1, 0.5, 50, dtype=np.float32).reshape(10, 5)
    probs[3] = 0.6
    s = step1_scores(cams, probs, labels)
    q_img = np.quantile(cams[3], 0.99)
    q_right = np.quantile(cams[3][:, 5:], 0.99)
    assert s[0, 3] == pytest.approx(0.6, abs=1e-6)  # clipped at p
    assert s[1, 3] == pytest.approx(q_right * 0.6 / q_img, abs=1e-6)
    assert 0 < s[1, 3] < 0.6


@pytest.mark.parametrize("level, kept", [(0.015, False), (0.03, True)])
def test_min_ratio_threshold(level, kept):
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    cams[3, :, :5] = 1.0
    cams[3, :, 5:] = level
    probs[3] = 0.8
    s = step1_scores(cams, probs, labels)
    if kept:
        assert s[1, 3] == pytest.approx(level * 0.8, abs=1e-6)
        assert s[1, NEGATIVE] == 0
    else:
        assert s[1, 3] == 0
        assert s[1, NEGATIVE] == pytest.approx(probs[NEGATIVE])
    # a stricter ratio drops it too
    assert step1_scores(cams, probs, labels, min_ratio=0.05)[1, 3] == 0


def test_min_prob_is_strict_and_nothing_examined_gives_one_minus_max_p():
    labels, cams, probs = two_cells(), cams_zero(), base_probs(0.002)
    cams[3, :, :5] = 1.0
    probs[3] = 0.01  # not > 0.01: never examined
    s = step1_scores(cams, probs, labels)
    expected = np.zeros((2, 19), np.float32)
    expected[:, NEGATIVE] = 1.0 - 0.01
    np.testing.assert_allclose(s, expected, atol=1e-7)
    np.testing.assert_allclose(reference(cams, probs, labels), expected, atol=1e-7)
    # with a lower min_prob the class is examined and found
    assert step1_scores(cams, probs, labels, min_prob=0.005)[0, 3] == pytest.approx(0.01)


def test_examined_but_nothing_kept_gives_max_p():
    labels, cams, probs = two_cells(), cams_zero(), base_probs(0.002)
    probs[5] = 0.7  # examined, but its CAM misses every cell (all zero)
    probs[NEGATIVE] = 0.2
    s = step1_scores(cams, probs, labels)
    expected = np.zeros((2, 19), np.float32)
    expected[:, NEGATIVE] = 0.7
    np.testing.assert_allclose(s, expected, atol=1e-7)
    np.testing.assert_allclose(reference(cams, probs, labels), expected, atol=1e-7)


def test_negative_examined_through_its_cam():
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    cams[3, :, :5] = 1.0
    probs[3] = 0.8
    cams[NEGATIVE, :, 5:] = 1.0
    probs[NEGATIVE] = 0.6
    s = step1_scores(cams, probs, labels)
    assert s[0, 3] == pytest.approx(0.8) and s[0, NEGATIVE] == 0
    assert s[1, NEGATIVE] == pytest.approx(0.6) and s[1, 3] == 0


def test_zero_image_quantile_is_a_limit():
    # 400 pixels, 2 bright: the image q99 is 0, the 4-pixel cell's q99 is positive -> conf = p
    labels = np.zeros((20, 20), np.int32)
    labels[:10] = 1
    labels[10:, :] = 2
    labels[0:2, 0:2] = 3
    cams = np.zeros((19, 20, 20), np.float32)
    cams[4, 0, 0] = cams[4, 0, 1] = 1.0
    probs = base_probs()
    probs[4] = 0.4
    s = step1_scores(cams, probs, labels)
    assert np.quantile(cams[4], 0.99) == 0
    assert s[2, 4] == pytest.approx(0.4)
    assert s[0, 4] == 0 and s[1, 4] == 0
    np.testing.assert_allclose(reference(cams, probs, labels), s, atol=1e-7)


def test_cell_ids_order_absent_ids_and_torch_inputs():
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    cams[3, :, :5] = 1.0
    probs[3] = 0.8
    s = step1_scores(torch.from_numpy(cams), torch.from_numpy(probs), labels, cell_ids=np.array([2, 1, 99]))
    assert s.shape == (3, 19) and s.dtype == np.float32
    assert s[1, 3] == pytest.approx(0.8)
    assert s[0, NEGATIVE] == pytest.approx(probs[NEGATIVE]) and s[2, NEGATIVE] == pytest.approx(probs[NEGATIVE])
    assert s[2, :NEGATIVE].sum() == 0
    assert step1_scores(cams, probs, np.zeros((10, 10), np.int32)).shape == (0, 19)


def test_low_resolution_cams_are_resized_to_the_labels():
    labels = two_cells(64)
    cams = np.zeros((19, 4, 4), np.float32)
    cams[2, :, :2] = 1.0
    probs = base_probs()
    probs[2] = 0.9
    s = step1_scores(cams, probs, labels)
    assert s[0, 2] == pytest.approx(0.9)
    assert s[1, 2] < 0.9
    np.testing.assert_allclose(reference(cams, probs, labels), s, atol=1e-6)


def test_present_ids():
    lab = np.array([[0, 3, 3], [7, 0, 3]], np.int32)
    np.testing.assert_array_equal(present_ids(lab), [3, 7])


# --------------------------------------------------------------------------- vs reference


def test_grouped_quantiles_equal_numpy_quantile():
    rng = np.random.default_rng(5)
    P, k, n = 3000, 5, 12
    values = (rng.standard_normal((P, k)) * 3).astype(np.float32)
    values[:, 1] = np.round(values[:, 1])  # many ties
    values[:, 2] = 0.25  # constant column
    group = rng.integers(0, n + 1, P).astype(np.int32)  # n = no group
    group[group == 4] = n  # group 4 empty
    for q in (0.99, 0.5, 0.0, 1.0):
        qg, qa, counts = grouped_quantiles(np.ascontiguousarray(values.T), group, n, quantile=q)
        np.testing.assert_array_equal(qa, np.quantile(values, q, axis=0))
        for g in range(n):
            if counts[g] == 0:
                assert g == 4 and np.all(qg[g] == 0)
                continue
            np.testing.assert_array_equal(qg[g], np.quantile(values[group == g], q, axis=0))


def test_grouped_quantiles_relu_zeros_and_negative_values():
    rng = np.random.default_rng(8)
    P, n = 5000, 9
    values = np.maximum(rng.standard_normal((3, P)).astype(np.float32), 0)  # half exact zeros
    values[2, :4000] = 0  # a class that is mostly zero
    group = rng.integers(0, n + 1, P).astype(np.int32)
    for q in (0.99, 0.5, 0.1):
        qg, qa, _ = grouped_quantiles(values, group, n, quantile=q)
        np.testing.assert_array_equal(qa, np.quantile(values, q, axis=1))
        for g in range(n):
            np.testing.assert_array_equal(qg[g], np.quantile(values[:, group == g], q, axis=1))
    # negative values: their order is the float order too
    neg = values - 0.25
    qg, qa, _ = grouped_quantiles(neg, group, n, quantile=0.5)
    np.testing.assert_array_equal(qa, np.quantile(neg, 0.5, axis=1))
    np.testing.assert_array_equal(qg[3], np.quantile(neg[:, group == 3], 0.5, axis=1))


@pytest.mark.parametrize(
    "seed, size, cam, kind, kwargs",
    [
        (0, 128, 16, "uniform", {}),
        (1, 128, 8, "uniform", {"min_ratio": 0.5}),
        (2, 96, 12, "sparse", {}),
        (3, 128, 16, "smooth", {"quantile": 0.9, "min_ratio": 0.3}),
        (4, 64, 16, "uniform", {"min_prob": 0.5}),
        (5, 128, 16, "plateau", {}),
    ],
)
def test_vectorised_equals_reference_on_random_inputs(seed, size, cam, kind, kwargs):
    rng = np.random.default_rng(seed)
    labels = oracles.voronoi_labels(rng, size, 40)
    cams = rng.random((19, cam, cam), dtype=np.float32)
    if kind == "sparse":  # relu-like: many exact zeros, ties
        cams = np.maximum(cams - 0.7, 0) / 0.3
    elif kind == "smooth":  # blob-like CAMs
        yy, xx = np.mgrid[:cam, :cam]
        cy, cx = rng.random((2, 19, 1, 1)) * cam
        cams = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.05 * cam**2)).astype(np.float32)
    elif kind == "plateau":  # floors above zero: flat maps, a raised floor, a flat top
        cams = np.maximum(cams, 0.6)
        cams[:4] = 0.5
        cams[4:8] = np.minimum(rng.random((4, cam, cam), dtype=np.float32), 0.3)
    probs = rng.random(19).astype(np.float32)
    probs[rng.random(19) < 0.3] = 0.005
    got = step1_scores(cams, probs, labels, **kwargs)
    want = reference(cams, probs, labels, **kwargs)
    assert len(got) == len(np.unique(labels)) - 1
    np.testing.assert_array_equal(got, want)  # bit for bit: np.quantile's own rule
    assert (got > 0).sum() > len(got)  # not trivially empty


