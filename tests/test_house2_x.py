"""Issue 21 (the house, part 2): one owner per file format and per rule, seen from the seams."""

from __future__ import annotations

import numpy as np
import pytest

from hpa_kernel.formats import truth as truth_fmt
from hpa_kernel.tools import metric


def test_truth_folder_round_trips_through_the_one_writer_and_reader(tmp_path):
    labels = np.zeros((5, 7), np.int32)
    labels[1:3, 1:3], labels[3:5, 4:7] = 1, 300
    truth_fmt.write_label_image(tmp_path, "img", labels)
    truth_fmt.write_truth_index(tmp_path, {"img": {1: [3, 0], 300: [18]}, "neg": {}})
    back = truth_fmt.read_label_image(tmp_path, "img")
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    assert truth_fmt.read_truth_index(tmp_path) == {"img": {1: [0, 3], 300: [18]}}


def test_truth_writer_refuses_ids_a_png_cannot_hold(tmp_path):
    with pytest.raises(truth_fmt.TruthError, match="0..65535"):
        truth_fmt.write_label_image(tmp_path, "big", np.full((2, 2), 70000, np.int32))


def test_metric_reads_truth_through_formats_truth():
    assert metric.read_truth_index is truth_fmt.read_truth_index
    assert metric.read_label_image is truth_fmt.read_label_image
    assert metric.TruthError is truth_fmt.TruthError
