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


def test_the_codec_decodes_many_masks_into_one_label_image_first_listed_wins():
    from hpa_kernel.formats.rle import decode_label_image, decode_mask, encode_mask

    rng = np.random.default_rng(21)
    h, w = 23, 31
    masks = [rng.random((h, w)) < p for p in (0.3, 0.5, 0.0, 0.2)]  # overlapping, one empty
    texts = [encode_mask(m) for m in masks]
    want = np.zeros((h, w), np.int32)
    for i in range(len(masks) - 1, -1, -1):
        want[decode_mask(texts[i], h, w)] = i + 1
    labels, areas = decode_label_image(texts, h, w)
    assert np.array_equal(labels, want)
    assert areas.tolist() == [int(m.sum()) for m in masks]
    with pytest.raises(ValueError, match="mask 1:"):
        decode_label_image([texts[0], texts[1][:-4]], h, w)


def test_training_and_fitting_score_with_the_competitions_ap():
    """Issue 21 item 5: one AP. The training log's image-level AP is the metric's
    (interpolated: here 0.7333, where the step-wise AP of sklearn says 0.7)."""
    from hpa_kernel.train.metrics import image_ap, macro_map

    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    target = np.array([1, 0, 0, 1, 1])
    assert image_ap(scores, target) == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert image_ap(scores, target) == metric.average_precision(scores, target.astype(bool), 3)
    probs, targets = np.stack([scores, scores], 1), np.stack([target, np.zeros(5, int)], 1)
    assert macro_map(probs, targets) == image_ap(scores, target)  # class 1 has no positive: left out


def test_fit_weights_matches_cells_by_the_metrics_rule():
    from hpa_kernel.train.fit_weights import class_ap

    # pooled detections, best truth cell per detection (-1: none at the IoU threshold)
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.0])
    key = np.array([3, 3, -1, 5, 5])
    present = np.array([True, True, True, True, True])
    tp = metric.take_cells(key)  # the second detection of cell 3 comes too late
    assert tp.tolist() == [True, False, False, True, False]
    want = metric.average_precision(conf[:4], tp[:4], 2)  # a zero confidence is no detection
    assert class_ap(conf, present, key, 2) == want
    ious = np.array([[0.9, 0.1], [0.7, 0.2], [0.3, 0.5], [0.1, 0.6]])
    assert metric.match_class(ious).tolist() == metric.take_cells([0, -1, -1, 1]).tolist()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_channel_png_round_trips_through_the_one_writer_and_reader(tmp_path, dtype):
    from hpa_kernel.formats.images import CHANNELS, channel_path, read_channel, read_rgby, write_channel

    rng = np.random.default_rng(0)
    low = 256 if dtype == np.uint16 else 0  # 16-bit values over 255: read back as 16-bit
    rgby = rng.integers(low, np.iinfo(dtype).max, (6, 9, 4), endpoint=True).astype(dtype)
    for c, name in enumerate(CHANNELS):  # a strided view is written as the plane it is
        assert write_channel(channel_path(tmp_path, "img", name), rgby[..., c]) == tmp_path / f"img_{name}.png"
    back = read_channel(tmp_path / "img_green.png")
    assert back.dtype == dtype and np.array_equal(back, rgby[..., 1])
    assert np.array_equal(read_rgby(tmp_path, "img"), rgby)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32)])
def test_channel_writer_refuses_what_is_not_one_plane(tmp_path, bad):
    from hpa_kernel.formats.images import write_channel

    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        write_channel(tmp_path / "x.png", bad)
    assert not (tmp_path / "x.png").exists()


def test_image_labels_csv_round_trips_through_the_writer_and_the_trainer_reader(tmp_path):
    from hpa_kernel.train.prepare import read_label_csv

    path = truth_fmt.write_image_labels(tmp_path / "train.csv", {"b": [5, 0], "a": [18], "0012": [11]})
    assert path.read_text() == "ID,Label\nb,0|5\na,18\n0012,11\n"
    df = read_label_csv(path)
    assert list(df["ID"]) == ["b", "a", "0012"] and list(df["Label"]) == ["0|5", "18", "11"]
