"""hpa_kernel.stages.labels: the label-image helpers (ids, index, resize, boxes, runs, relabel)."""

from __future__ import annotations

import numpy as np
import pytest

from hpa_kernel.stages.labels import (
    cell_index,
    label_boxes,
    label_runs,
    present_ids,
    relabel,
    remove_small_labels,
    resize_labels,
)


def test_present_ids():
    lab = np.array([[0, 3, 3], [7, 0, 3]], np.int32)
    np.testing.assert_array_equal(present_ids(lab), [3, 7])
    assert present_ids(np.zeros((0, 0), np.int32)).size == 0
    assert present_ids(np.zeros((2, 2), np.int32)).size == 0


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_cell_index_rows_and_outsiders(dtype):
    lab = np.array([[0, 3, 3], [7, 9, 3]], dtype)
    ids = np.array([3, 7])  # 9 is not asked for
    np.testing.assert_array_equal(cell_index(lab, ids), [2, 0, 0, 1, 2, 0])
    big = np.array([[0, 10**9]], dtype=np.int64)  # sparse labels: the search path
    np.testing.assert_array_equal(cell_index(big, np.array([10**9])), [1, 0])
    assert cell_index(lab, np.array([], np.int64)).shape == (6,)


def test_resize_labels_keeps_dtype_range():
    lab = np.array([[0, 70_000], [5, 1]], np.int64)
    r = resize_labels(lab, 4, 4)
    assert r.dtype == np.int32 and r.max() == 70_000
    assert resize_labels(np.array([[0, 3]], np.uint8), 4, 2).dtype == np.uint16
    with pytest.raises(ValueError, match="negative"):
        resize_labels(np.array([[-1, 0]]), 2, 2)


def test_label_boxes_half_open_and_absent_ids():
    lab = np.zeros((10, 12), np.int32)
    lab[2:5, 3:9] = 1
    lab[7:10, 0:2] = 4
    boxes = label_boxes(lab, np.array([4, 1, 2, 30]))
    np.testing.assert_array_equal(boxes, [[7, 0, 10, 2], [2, 3, 5, 9], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_label_runs_fortran_order():
    lab = np.array([[1, 1], [2, 1]])
    starts, lengths, values = label_runs(lab)
    # Fortran flattening: 1, 2, 1, 1
    np.testing.assert_array_equal(starts, [0, 1, 2])
    np.testing.assert_array_equal(lengths, [1, 1, 2])
    np.testing.assert_array_equal(values, [1, 2, 1])


def test_remove_small_labels_is_strictly_smaller():
    lab = np.array([[1, 1, 2], [0, 3, 3]], np.int32)
    np.testing.assert_array_equal(remove_small_labels(lab, 2), [[1, 1, 0], [0, 3, 3]])
    assert remove_small_labels(lab, 1) is lab


def test_relabel_ascending():
    cells = np.array([[0, 5, 5], [9, 9, 2]], np.int32)
    new = relabel(cells)
    np.testing.assert_array_equal(new, [[0, 2, 2], [3, 3, 1]])
    assert new.dtype == np.int32
    assert relabel(cells.astype(np.uint16)).dtype == np.int32
    assert relabel(np.zeros((3, 3), np.int32)).max() == 0
