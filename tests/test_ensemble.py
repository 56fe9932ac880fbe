"""Ensemble: steps and models weighted per cell and class, top classes per image."""

from __future__ import annotations

import numpy as np
import pytest

from hpa_kernel.stages.ensemble import combine_models, combine_steps, select_top_classes


def test_combine_steps_weights_are_normalised():
    s1 = np.full((2, 19), 0.2, np.float32)
    s2 = np.full((2, 19), 0.8, np.float32)
    np.testing.assert_allclose(combine_steps(s1, s2), 0.5, atol=1e-7)
    np.testing.assert_allclose(combine_steps(s1, s2, 3, 1), 0.35, atol=1e-7)
    np.testing.assert_allclose(combine_steps(s1, s2, 6, 2), 0.35, atol=1e-7)
    np.testing.assert_allclose(combine_steps(s1, s2, 1, 0), 0.2, atol=1e-7)
    out = combine_steps(s1, s2)
    assert out.dtype == np.float32 and out.shape == (2, 19)


def test_combine_steps_one_missing():
    s = np.random.default_rng(0).random((3, 19)).astype(np.float32)
    np.testing.assert_array_equal(combine_steps(s, None), s)
    np.testing.assert_array_equal(combine_steps(None, s, 0.9, 0.1), s)
    assert combine_steps(s, None) is not s
    with pytest.raises(ValueError):
        combine_steps(None, None)
    with pytest.raises(ValueError):
        combine_steps(s, s, 0, 0)
    with pytest.raises(ValueError):
        combine_steps(s, s[:2])


def test_combine_models_weighted_average():
    a = np.zeros((2, 19), np.float32)
    b = np.ones((2, 19), np.float32)
    c = np.full((2, 19), 0.5, np.float32)
    np.testing.assert_allclose(combine_models([a, b], [1, 3]), 0.75, atol=1e-7)
    np.testing.assert_allclose(combine_models([a, b, c]), 0.5, atol=1e-7)
    np.testing.assert_allclose(combine_models([b]), 1.0)
    with pytest.raises(ValueError):
        combine_models([])
    with pytest.raises(ValueError):
        combine_models([a, b], [1])
    with pytest.raises(ValueError):
        combine_models([a, b], [1, -1])


def test_select_top_classes_by_max_over_cells_and_floor():
    s = np.zeros((3, 19), np.float32)
    s[0, 2] = 0.9
    s[1, 2] = 0.1
    s[2, 5] = 0.7
    s[0, 7] = 0.3
    s[1, 8] = 0.05
    out = select_top_classes(s, top_n=2)
    assert out[0, 2] == pytest.approx(0.9) and out[1, 2] == pytest.approx(0.1)  # whole class kept
    assert out[2, 5] == pytest.approx(0.7)
    assert out[0, 7] == 0 and out[1, 8] == 0
    assert s[0, 7] == pytest.approx(0.3)  # input untouched
    floored = select_top_classes(s, top_n=18, floor=0.1)
    assert floored[1, 2] == 0 and floored[1, 8] == 0 and floored[0, 7] == pytest.approx(0.3)
    np.testing.assert_array_equal(select_top_classes(s, top_n=19), s)
    assert select_top_classes(np.zeros((0, 19), np.float32)).shape == (0, 19)


def test_combine_steps_per_class_weights():
    rng = np.random.default_rng(1)
    s1, s2 = rng.random((5, 19)).astype(np.float32), rng.random((5, 19)).astype(np.float32)
    w1 = np.linspace(0.0, 1.0, 19)
    out = combine_steps(s1, s2, w1, 1.0 - w1)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], s2[:, 0], rtol=1e-6)  # class 0: Step 2 only
    np.testing.assert_allclose(out[:, -1], s1[:, -1], rtol=1e-6)  # class 18: Step 1 only
    np.testing.assert_allclose(out, (w1 * s1 + (1 - w1) * s2), rtol=1e-6)
    # equal per-class weights give what the scalar pair gives
    np.testing.assert_allclose(combine_steps(s1, s2, [2.0] * 19, [2.0] * 19), combine_steps(s1, s2), rtol=1e-6)
    with pytest.raises(ValueError, match="not both 0"):
        combine_steps(s1, s2, [0.0] * 19, [0.0] * 18 + [1.0])
