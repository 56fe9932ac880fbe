"""Step 1 (CAM ∩ cells): hand-made cases with known answers, and the vectorised code
against the straightforward reference in bench/step1.py on random inputs."""

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


def test_top_classes_ranked_by_probability():
    labels, cams, probs = two_cells(), cams_zero(), base_probs()
    for c, p in [(3, 0.9), (5, 0.5), (7, 0.7)]:
        cams[c, :, :5] = 1.0
        probs[c] = p
    s = step1_scores(cams, probs, labels, top_classes=2)
    assert s[0, 3] == pytest.approx(0.9) and s[0, 7] == pytest.approx(0.7) and s[0, 5] == 0
    assert s[1, NEGATIVE] == pytest.approx(probs[NEGATIVE])
    np.testing.assert_allclose(reference(cams, probs, labels, top_classes=2), s, atol=1e-7)
    # a cell whose only class is cut gets Negative
    cams2, probs2 = cams.copy(), probs.copy()
    cams2[5] = 0
    cams2[5, :, 5:] = 1.0  # class 5 now only on cell 2
    s2 = step1_scores(cams2, probs2, labels, top_classes=2)
    assert s2[1, 5] == 0 and s2[1, NEGATIVE] == pytest.approx(probs[NEGATIVE])
    assert step1_scores(cams2, probs2, labels, top_classes=3)[1, 5] == pytest.approx(0.5)


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
        np.testing.assert_allclose(qa, np.quantile(values, q, axis=0), rtol=0, atol=1e-6)
        for g in range(n):
            if counts[g] == 0:
                assert g == 4 and np.all(qg[g] == 0)
                continue
            np.testing.assert_allclose(qg[g], np.quantile(values[group == g], q, axis=0), rtol=0, atol=1e-6)


def test_grouped_quantiles_relu_zeros_and_wrong_bounds():
    rng = np.random.default_rng(8)
    P, n = 5000, 9
    values = np.maximum(rng.standard_normal((3, P)).astype(np.float32), 0)  # half exact zeros
    values[2, :4000] = 0  # a class that is mostly zero
    group = rng.integers(0, n + 1, P).astype(np.int32)
    for bounds in (None, np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 0.5]])):
        for q in (0.99, 0.5, 0.1):
            qg, qa, _ = grouped_quantiles(values, group, n, quantile=q, bounds=bounds)
            np.testing.assert_allclose(qa, np.quantile(values, q, axis=1), atol=1e-6)
            for g in range(n):
                np.testing.assert_allclose(qg[g], np.quantile(values[:, group == g], q, axis=1), atol=1e-6)
    # bounds claiming a floor of 0 while values go negative: still exact
    neg = values - 0.25
    qg, qa, _ = grouped_quantiles(neg, group, n, quantile=0.5, bounds=np.array([[0.0, 1.0]] * 3))
    np.testing.assert_allclose(qa, np.quantile(neg, 0.5, axis=1), atol=1e-6)
    np.testing.assert_allclose(qg[3], np.quantile(neg[:, group == 3], 0.5, axis=1), atol=1e-6)


def test_grouped_quantiles_redo_wrong_guesses(monkeypatch):
    """Thresholds guessed too high (for some groups, and for the whole array) are detected
    by the exact counts and redone: the result is still exact."""
    import hpa_kernel.stages.step1 as step1

    rng = np.random.default_rng(6)
    P, k, n = 2000, 3, 7
    values = rng.random((P, k), dtype=np.float32)
    group = rng.integers(0, n + 1, P).astype(np.int32)
    real = step1._guess_thresholds

    def too_high(*args, **kw):
        T, T_all = real(*args, **kw)
        T[:, ::2] = 0.999  # far too few values above this
        return T, np.full_like(T_all, 0.999)

    monkeypatch.setattr(step1, "_guess_thresholds", too_high)
    qg, qa, _ = grouped_quantiles(np.ascontiguousarray(values.T), group, n, quantile=0.9)
    np.testing.assert_allclose(qa, np.quantile(values, 0.9, axis=0), atol=1e-6)
    for g in range(n):
        np.testing.assert_allclose(qg[g], np.quantile(values[group == g], 0.9, axis=0), atol=1e-6)


@pytest.mark.parametrize(
    "seed, size, cam, kind, kwargs",
    [
        (0, 128, 16, "uniform", {}),
        (1, 128, 8, "uniform", {"top_classes": 5}),
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
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (got > 0).sum() > len(got)  # not trivially empty


def test_class_chunks_and_coarse_histograms_give_the_same_scores(monkeypatch):
    import hpa_kernel.stages.step1 as step1

    rng = np.random.default_rng(7)
    labels = oracles.voronoi_labels(rng, 64, 30)
    cams = rng.random((19, 8, 8), dtype=np.float32)
    probs = rng.random(19).astype(np.float32)
    whole = step1_scores(cams, probs, labels)
    monkeypatch.setattr(step1, "_MAX_PLANE_BYTES", 3 * 64 * 64 * 4)  # 3 classes at a time
    monkeypatch.setattr(step1, "_MAX_HIST_BINS", 1)  # the coarsest guesses
    np.testing.assert_array_equal(step1_scores(cams, probs, labels), whole)


def test_values_on_the_floor_are_counted_not_sorted(monkeypatch):
    """Values equal to a row's minimum (flat maps, raised floors, relu zeros) are counted
    per group; only the values above it reach the sort, and the result stays exact."""
    import hpa_kernel.stages.step1 as step1

    rng = np.random.default_rng(11)
    P, n = 4000, 6
    values = np.empty((3, P), dtype=np.float32)
    values[0] = 0.5  # flat
    values[1] = np.maximum(rng.random(P, dtype=np.float32), 0.9)  # 90 % on a raised floor
    values[2] = np.maximum(rng.standard_normal(P).astype(np.float32), -0.2)  # negative floor
    group = rng.integers(0, n + 1, P).astype(np.int32)
    sorted_sizes = []
    real = step1._select_sorted

    def spy(keys_group, vals, n_groups, rank):
        sorted_sizes.append(len(vals))
        return real(keys_group, vals, n_groups, rank)

    monkeypatch.setattr(step1, "_select_sorted", spy)
    for q in (0.99, 0.5):
        sorted_sizes.clear()
        qg, qa, _ = grouped_quantiles(values, group, n, quantile=q)
        np.testing.assert_allclose(qa, np.quantile(values, q, axis=1), rtol=0, atol=1e-6)
        for g in range(n):
            np.testing.assert_allclose(qg[g], np.quantile(values[:, group == g], q, axis=1), rtol=0, atol=1e-6)
        assert sorted_sizes[0] == 0  # the flat row sorts nothing
        assert sorted_sizes[1] <= 0.1 * P + 50  # only the values above the floor, at most


def test_bench_floor_and_tile_share_count_what_they_say():
    rng = np.random.default_rng(12)
    labels = oracles.voronoi_labels(rng, 64, 10)
    cams = rng.random((19, 8, 8), dtype=np.float32)
    probs = np.full(19, 0.5, dtype=np.float32)
    probs[:4] = 0.001  # not examined
    f = bench.numpy_floor(cams, probs, labels, repeats=1)
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    assert f["classes"] == 15
    assert f["values"] == 15 * int((counts - np.floor(0.99 * (counts - 1))).sum())
    share = bench.tile_share(cams, probs, labels)
    assert 0 < share < 1
    flat = np.full_like(cams, 0.3)  # every value on the floor: nothing to evaluate
    assert bench.tile_share(flat, probs, labels) == 0
    spike = np.zeros_like(cams)
    spike[:, 0, 0] = 1.0  # only the tiles touching CAM pixel (0, 0) can reach a quantile > 0
    assert 0 < bench.tile_share(spike, probs, labels) < 0.2
