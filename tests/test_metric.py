"""Tests of hpa_kernel.tools.metric: tiny hand-made cases whose AP is worked out on paper.

AP arithmetic convention used in the comments: detections ranked by confidence, P = running
precision, R = running recall, P made monotone from the right (Pm), AP = sum(dR * Pm).
"""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from hpa_kernel.tools.metric import (
    MetricResult,
    SubmissionError,
    TruthError,
    average_precision,
    box_iou,
    evaluate,
    evaluate_arrays,
    label_boxes,
    main,
    mask_boxes,
    mask_iou,
    match_class,
    score_image,
)
from hpa_kernel.formats.rle import encode_mask
from hpa_kernel.formats.submission import parse_prediction_string, write_submission


# ----------------------------------------------------------------------------- fixtures


def grid(*rows: str) -> np.ndarray:
    """Label image from strings: '.' = background, digits = cell ids."""
    return np.array([[0 if ch == "." else int(ch) for ch in r] for r in rows], dtype=np.int32)


# Three cells in a 4x8 (non-square) image, each 2x2 = 4 px; background elsewhere.
LAB3 = grid(
    "11..22..",
    "11..22..",
    "....33..",
    "....33..",
)


def m(labels: np.ndarray, *cells: int) -> np.ndarray:
    """Mask of the union of the given cells."""
    return np.isin(labels, cells)


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-12)


# ----------------------------------------------------------------------------- AP


def test_average_precision_by_hand():
    # TP FP TP, n_gt 3: P = 1, 1/2, 2/3; R = 1/3, 1/3, 2/3; Pm = 1, 2/3, 2/3
    # AP = 1/3 * 1 + 0 + 1/3 * 2/3 = 5/9
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 3) == approx(5 / 9)
    # unsorted input is ranked by confidence: same detections -> same AP
    assert average_precision([0.7, 0.9, 0.8], [True, True, False], 3) == approx(5 / 9)
    assert average_precision([], [], 4) == 0.0
    assert average_precision([0.5, 0.4], [False, False], 2) == 0.0
    with pytest.raises(ValueError):
        average_precision([0.5], [True], 0)


def test_average_precision_ties_keep_given_order():
    # equal confidences: stable order. [FP, TP]: P = 0, 1/2; R = 0, 1 -> AP = 1 * 1/2
    assert average_precision([0.5, 0.5], [False, True], 1) == approx(0.5)
    # [TP, FP]: P = 1, 1/2; R = 1, 1 -> AP = 1
    assert average_precision([0.5, 0.5], [True, False], 1) == approx(1.0)


# ----------------------------------------------------------------------------- IoU


def test_mask_iou_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(9, 13)).astype(np.uint16)
    masks = [rng.random((9, 13)) < p for p in (0.1, 0.5, 0.9)] + [labels == 3]
    cells = np.array([1, 3, 5, 7])  # 7 is absent from the image
    got = mask_iou(masks, labels, cells)
    for i, mk in enumerate(masks):
        for j, c in enumerate(cells):
            g = labels == c
            union = (mk | g).sum()
            assert got[i, j] == approx((mk & g).sum() / union if union else 0.0)
    assert got[3, 1] == 1.0 and got[0, 3] == 0.0


def test_boxes_and_box_iou_match_brute_force():
    rng = np.random.default_rng(1)
    labels = np.zeros((12, 10), np.int32)
    labels[1:4, 2:9] = 1
    labels[5:11, 0:3] = 2
    labels[6, 7] = 2  # widens cell 2's box
    masks = [labels == 1, labels == 2, rng.random((12, 10)) < 0.05, np.zeros((12, 10), bool)]
    mb = mask_boxes(masks)
    np.testing.assert_array_equal(mb[:2], [[1, 2, 4, 9], [5, 0, 11, 8]])
    np.testing.assert_array_equal(mb[3], [0, 0, 0, 0])
    lb = label_boxes(labels, np.array([2, 1, 9]))
    np.testing.assert_array_equal(lb, [[5, 0, 11, 8], [1, 2, 4, 9], [0, 0, 0, 0]])

    def fill(b):
        out = np.zeros((12, 10), bool)
        out[b[0] : b[2], b[1] : b[3]] = True
        return out

    got = box_iou(mb, lb)
    for i in range(len(mb)):
        for j in range(len(lb)):
            a, b = fill(mb[i]), fill(lb[j])
            union = (a | b).sum()
            assert got[i, j] == approx((a & b).sum() / union if union else 0.0)


def test_match_class_no_fallback_and_first_come():
    # rows = detections in rank order, cols = GT cells
    ious = np.array(
        [
            [0.9, 0.7],  # best cell 0 -> TP, takes 0
            [0.8, 0.7],  # best cell 0, taken -> FP (cell 1 at 0.7 is NOT tried)
            [0.5, 0.4],  # best cell 0 below threshold -> FP, takes nothing
            [0.1, 0.6],  # best cell 1 at exactly 0.6 -> TP
            [0.0, 0.0],  # no overlap -> FP
        ]
    )
    np.testing.assert_array_equal(match_class(ious), [True, False, False, True, False])


# ----------------------------------------------------------------------------- rules


def test_perfect_predictions_score_one():
    truth = {"a": (LAB3, {1: [0], 2: [0, 5], 3: [18]})}
    dets = [(0, 0.9, m(LAB3, 1)), (0, 0.8, m(LAB3, 2)), (5, 0.7, m(LAB3, 2)), (18, 0.6, m(LAB3, 3))]
    r = evaluate_arrays(truth, {"a": dets})
    assert r.mAP == 1.0
    assert r.per_class == {0: 1.0, 5: 1.0, 18: 1.0}
    assert r.n_gt == {0: 2, 5: 1, 18: 1}
    assert r.n_det == {0: 2, 5: 1, 18: 1} and r.n_tp == r.n_det
    assert r.n_images == 1 and r.n_dropped == 0


def test_duplicate_detection_is_false_positive():
    truth = {"a": (LAB3, {1: [0], 2: [0]})}
    dets = [(0, 0.9, m(LAB3, 1)), (0, 0.8, m(LAB3, 1)), (0, 0.7, m(LAB3, 2))]
    # TP FP TP, n_gt 2: P = 1, 1/2, 2/3; R = 1/2, 1/2, 1; Pm = 1, 2/3, 2/3
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    r = evaluate_arrays(truth, {"a": dets})
    assert r.per_class[0] == approx(5 / 6)
    assert r.n_tp[0] == 2 and r.n_det[0] == 3


def test_best_cell_taken_no_fallback_mask():
    # 1x10 image: cell 1 = cols 0-4, cell 2 = cols 5-9, both class 0.
    lab = grid("1111122222")
    wide = np.zeros_like(lab, bool)
    wide[0, :9] = True  # IoU cell 1 = 5/9 = 0.556, cell 2 = 4/10 = 0.4
    dets = [(0, 0.9, m(lab, 1)), (0, 0.8, wide)]
    # threshold 0.3 so that cell 2 WOULD match if a fall-back existed.
    # det 1 TP (takes cell 1); det 2's best cell 1 is taken -> FP.
    # TP FP, n_gt 2: P = 1, 1/2; R = 1/2, 1/2 -> AP = 1/2 * 1 = 1/2 (a fall-back would give 1)
    r = evaluate_arrays({"a": (lab, {1: [0], 2: [0]})}, {"a": dets}, iou_threshold=0.3)
    assert r.per_class[0] == approx(0.5)


def test_best_cell_taken_no_fallback_box():
    # Interleaved combs: cell 1 = even rows, cell 2 = odd rows of a 10x10 image.
    # Boxes: cell 1 rows [0,9), cell 2 rows [1,10), all columns -> box IoU = 80/100 = 0.8.
    lab = np.repeat(np.array([1, 2] * 5, np.int32)[:, None], 10, axis=1)
    dets = [(0, 0.9, m(lab, 1)), (0, 0.8, m(lab, 1))]
    truth = {"a": (lab, {1: [0], 2: [0]})}
    # box: det 2's best box is cell 1 (IoU 1, taken); cell 2 (IoU 0.8 >= 0.6) is not tried.
    # TP FP, n_gt 2 -> AP = 1/2 * 1 = 1/2 (a fall-back would give 1)
    assert evaluate_arrays(truth, {"a": dets}, iou="box").per_class[0] == approx(0.5)
    # sanity: a detection of cell 2's own mask is a TP in box mode -> AP 1
    dets2 = [(0, 0.9, m(lab, 1)), (0, 0.8, m(lab, 2))]
    assert evaluate_arrays(truth, {"a": dets2}, iou="box").per_class[0] == 1.0


def test_misses_and_class_without_predictions():
    truth = {"a": (LAB3, {1: [0], 2: [0], 3: [5]})}
    half = m(LAB3, 3) & (np.arange(8) == 4)[None, :]  # 2 px of cell 3 -> IoU 2/4 = 0.5
    dets = [(0, 0.9, m(LAB3, 2)), (5, 0.9, half)]
    # class 0: TP, n_gt 2 -> AP = 1/2 * 1 = 1/2
    # class 5: FP only -> AP 0
    r = evaluate_arrays(truth, {"a": dets})
    assert r.per_class == {0: approx(0.5), 5: 0.0}
    assert r.mAP == approx(0.25)
    # class 5 with GT and no prediction at all also scores 0
    r = evaluate_arrays(truth, {"a": dets[:1]})
    assert r.per_class[5] == 0.0 and r.n_det[5] == 0
    assert r.mAP == approx(0.25)


def test_several_classes_per_cell_and_wrong_cell():
    truth = {"a": (LAB3, {1: [0, 5], 2: [0]})}
    good = [(0, 0.9, m(LAB3, 1)), (5, 0.9, m(LAB3, 1)), (0, 0.8, m(LAB3, 2))]
    assert evaluate_arrays(truth, {"a": good}).mAP == 1.0
    # class 5 predicted on cell 2 (class 5 is among the image's labels) -> FP
    # class 5: FP@0.95, TP@0.9, n_gt 1: P = 0, 1/2; R = 0, 1 -> AP = 1/2
    # mAP = (1 + 1/2) / 2 = 3/4
    r = evaluate_arrays(truth, {"a": good + [(5, 0.95, m(LAB3, 2))]})
    assert r.per_class == {0: 1.0, 5: approx(0.5)}
    assert r.mAP == approx(0.75)


def test_image_without_predictions_or_missing_counts():
    truth = {"a": (LAB3, {1: [0]}), "b": (LAB3, {2: [0]})}
    dets_a = [(0, 0.9, m(LAB3, 1))]
    # class 0: n_gt 2 (one per image), one TP -> AP = 1/2 * 1 = 1/2
    assert evaluate_arrays(truth, {"a": dets_a, "b": []}).mAP == approx(0.5)
    assert evaluate_arrays(truth, {"a": dets_a}).mAP == approx(0.5)
    # predictions of an image without truth are ignored
    assert evaluate_arrays(truth, {"a": dets_a, "zz": dets_a}).mAP == approx(0.5)


def test_class_not_in_image_labels_is_dropped():
    # image a has only class 0; image b has class 3.
    truth = {"a": (LAB3, {1: [0]}), "b": (LAB3, {2: [3]})}
    preds = {
        "a": [(3, 0.99, m(LAB3, 2)), (3, 0.98, m(LAB3, 1)), (0, 0.5, m(LAB3, 1))],
        "b": [(3, 0.5, m(LAB3, 2)), (0, 0.99, m(LAB3, 2))],
    }
    # class-3 detections on a and the class-0 one on b are dropped: both classes AP 1
    r = evaluate_arrays(truth, preds)
    assert r.per_class == {0: 1.0, 3: 1.0}
    assert r.n_det == {0: 1, 3: 1} and r.n_dropped == 3


def test_empty_mask_is_dropped():
    truth = {"a": (LAB3, {1: [0]})}
    empty = np.zeros_like(LAB3, bool)
    r = evaluate_arrays(truth, {"a": [(0, 0.99, empty), (0, 0.5, m(LAB3, 1))]})
    assert r.per_class[0] == 1.0 and r.n_dropped == 1 and r.n_det[0] == 1


def test_negative_class_scored_like_any_class():
    truth = {"a": (LAB3, {1: [18], 2: [0]})}
    dets = [(18, 0.9, m(LAB3, 2)), (18, 0.8, m(LAB3, 1)), (0, 0.7, m(LAB3, 2))]
    # class 18: FP, TP, n_gt 1: P = 0, 1/2; R = 0, 1 -> AP 1/2; class 0: AP 1
    r = evaluate_arrays(truth, {"a": dets})
    assert r.per_class == {0: 1.0, 18: approx(0.5)}
    assert r.mAP == approx(0.75)


def test_box_and_mask_iou_disagree():
    # image a: L-shaped cell (19 px, box 10x10); the detection is the full 10x10 square:
    #   mask IoU 19/100 = 0.19 (FP), box IoU 100/100 = 1 (TP)
    lab_a = np.zeros((10, 10), np.int32)
    lab_a[0, :] = 1
    lab_a[:, 0] = 1
    # image b: 10x10 block + 20 px tail on row 0 (120 px, box 10x30); detection = block:
    #   mask IoU 100/120 = 0.83 (TP), box IoU 100/300 = 0.33 (FP)
    lab_b = np.zeros((10, 30), np.int32)
    lab_b[:, :10] = 1
    lab_b[0, :] = 1
    block = np.zeros((10, 30), bool)
    block[:, :10] = True
    truth = {"a": (lab_a, {1: [0]}), "b": (lab_b, {1: [1]})}
    preds = {"a": [(0, 0.9, np.ones((10, 10), bool))], "b": [(1, 0.9, block)]}
    rm = evaluate_arrays(truth, preds, iou="mask")
    rb = evaluate_arrays(truth, preds, iou="box")
    assert rm.per_class == {0: 0.0, 1: 1.0}
    assert rb.per_class == {0: 1.0, 1: 0.0}
    assert rm.iou == "mask" and rb.iou == "box"


def test_ranking_matters():
    # cells 1, 2 class 0; cell 3 class 5 (so class 0 on cell 3 is a FP, not dropped)
    truth = {"a": (LAB3, {1: [0], 2: [0], 3: [5]})}
    tps = [(0, 0.9, m(LAB3, 1)), (0, 0.8, m(LAB3, 2))]
    # FP on top: FP TP TP: P = 0, 1/2, 2/3; R = 0, 1/2, 1; Pm = 2/3, 2/3, 2/3 -> AP 2/3
    high = evaluate_arrays(truth, {"a": [(0, 0.95, m(LAB3, 3))] + tps}).per_class[0]
    # FP at the bottom: TP TP FP: P = 1, 1, 2/3; R = 1/2, 1, 1 -> AP 1
    low = evaluate_arrays(truth, {"a": tps + [(0, 0.1, m(LAB3, 3))]}).per_class[0]
    assert high == approx(2 / 3) and low == 1.0


def test_detections_pooled_over_images():
    # image a: TP@0.5; image b: FP@0.9 (class 0 on the class-1 cell), its class-0 cell missed
    truth = {"a": (LAB3, {1: [0]}), "b": (LAB3, {1: [0], 2: [1]})}
    preds = {"a": [(0, 0.5, m(LAB3, 1))], "b": [(0, 0.9, m(LAB3, 2))]}
    # pooled: FP@0.9, TP@0.5, n_gt 2: P = 0, 1/2; R = 0, 1/2 -> AP = 1/2 * 1/2 = 1/4
    r = evaluate_arrays(truth, preds)
    assert r.per_class[0] == approx(0.25) and r.per_class[1] == 0.0


def test_iou_exactly_at_threshold_is_tp():
    lab = grid("11111..", "....222")  # cell 1: 5 px, cell 2: 3 px
    three = m(lab, 1) & (np.arange(7) < 3)[None, :]  # 3 of 5 px -> IoU 3/5 = 0.6
    assert evaluate_arrays({"a": (lab, {1: [0]})}, {"a": [(0, 0.9, three)]}).per_class[0] == 1.0
    # 3 of 5 px plus one outside -> IoU 3/6 = 0.5 -> FP
    plus = three.copy()
    plus[1, 0] = True
    assert evaluate_arrays({"a": (lab, {1: [0]})}, {"a": [(0, 0.9, plus)]}).per_class[0] == 0.0
    # box mode: cell 1 box 1x5; detection box 1x3 -> 3/5 = 0.6 -> TP
    r = evaluate_arrays({"a": (lab, {1: [0]})}, {"a": [(0, 0.9, three)]}, iou="box")
    assert r.per_class[0] == 1.0


def test_within_image_ties_keep_submission_order():
    truth = {"a": (LAB3, {1: [0], 3: [5]})}
    tp, fp = (0, 0.5, m(LAB3, 1)), (0, 0.5, m(LAB3, 3))
    # FP first: P = 0, 1/2; R = 0, 1 -> 1/2.   TP first: P = 1, 1/2; R = 1, 1 -> 1
    assert evaluate_arrays(truth, {"a": [fp, tp]}).per_class[0] == approx(0.5)
    assert evaluate_arrays(truth, {"a": [tp, fp]}).per_class[0] == 1.0


def test_no_ground_truth_gives_nan_and_image_not_counted():
    r = evaluate_arrays({"a": (LAB3, {1: []})}, {"a": [(0, 0.9, m(LAB3, 1))]})
    assert np.isnan(r.mAP) and r.per_class == {} and r.n_images == 0


def test_score_image_rejects_bad_input():
    with pytest.raises(ValueError, match="mask shape"):
        score_image(LAB3, {1: [0]}, [(0, 0.5, np.ones((2, 2), bool))])
    with pytest.raises(ValueError, match="class"):
        score_image(LAB3, {1: [0]}, [(19, 0.5, m(LAB3, 1))])
    with pytest.raises(ValueError, match="confidence"):
        score_image(LAB3, {1: [0]}, [(0, float("nan"), m(LAB3, 1))])
    with pytest.raises(ValueError, match="iou"):
        score_image(LAB3, {1: [0]}, [], iou="bbox")


def test_format_table_lists_all_classes():
    r = evaluate_arrays({"a": (LAB3, {1: [0], 2: [18]})}, {"a": [(0, 0.9, m(LAB3, 1))]})
    lines = r.format_table().splitlines()
    assert len(lines) == 20
    assert lines[1].split()[0] == "0" and "Nucleoplasm" in lines[1] and lines[1].endswith("1.000000")
    assert "Negative" in lines[19] and lines[19].endswith("0.000000")
    assert lines[2].endswith("-")


def test_parse_prediction_string():
    assert parse_prediction_string("") == []
    assert parse_prediction_string("  ") == []
    assert parse_prediction_string("0 0.5 abc 18 1 xyz") == [(0, 0.5, "abc"), (18, 1.0, "xyz")]
    for bad in ("0 0.5", "x 0.5 abc", "0 y abc", "19 0.5 abc", "0 nan abc"):
        with pytest.raises(ValueError):
            parse_prediction_string(bad)


# ----------------------------------------------------------------------------- files


def write_truth(root, images: dict[str, tuple[np.ndarray, dict[int, list[int]]]]):
    (root / "labels").mkdir(parents=True)
    rows = []
    for image_id, (labels, cells) in images.items():
        assert cv2.imwrite(str(root / "labels" / f"{image_id}.png"), labels.astype(np.uint16))
        rows += [(image_id, c, "|".join(map(str, cls))) for c, cls in cells.items()]
    pd.DataFrame(rows, columns=["ID", "cell_id", "Label"]).to_csv(root / "cells.csv", index=False)
    return root


def sub_row(labels: np.ndarray, dets) -> tuple[int, int, str]:
    h, w = labels.shape
    return w, h, " ".join(f"{c} {conf} {encode_mask(mk)}" for c, conf, mk in dets)


def write_csv(rows: dict, path) -> None:
    """Rows as a submission file, in their order (the package's writer wants a sample)."""
    write_submission(rows, list(rows), path)


# A non-square 16-bit label image: cell ids above 255.
LAB16 = np.zeros((6, 11), np.int32)
LAB16[0:3, 0:4] = 300
LAB16[3:6, 5:11] = 301
LAB16[0:2, 7:10] = 2


@pytest.fixture
def truth_dir(tmp_path):
    return write_truth(
        tmp_path / "truth",
        {
            "img1": (LAB16, {300: [0, 5], 301: [0], 2: [18]}),
            "img2": (LAB3, {1: [0]}),
            "nogt": (LAB3, {1: []}),
        },
    )


def make_submission():
    # img1: class 0: TP(300)@0.9, TP(301)@0.8; class 5: FP(301)@0.95, TP(300)@0.7;
    #       class 18: TP(2)@0.6; class 7 dropped (not among img1's labels).
    # img2: class 0 on cell 1 missed (no detections); "extra" has no truth (ignored).
    # class 0: TP TP, n_gt 3 -> AP = 2/3; class 5: FP TP -> 1/2; class 18: 1
    # mAP = (2/3 + 1/2 + 1) / 3 = 13/18
    dets = [
        (0, 0.9, m(LAB16, 300)),
        (5, 0.7, m(LAB16, 300)),
        (0, 0.8, m(LAB16, 301)),
        (5, 0.95, m(LAB16, 301)),
        (18, 0.6, m(LAB16, 2)),
        (7, 0.99, m(LAB16, 2)),
    ]
    return {"img1": sub_row(LAB16, dets), "img2": sub_row(LAB3, []), "extra": sub_row(LAB3, [(0, 0.5, m(LAB3, 1))])}


def test_evaluate_files_and_rows(truth_dir, tmp_path):
    rows = make_submission()
    r = evaluate(rows, truth_dir)
    assert isinstance(r, MetricResult)
    assert r.per_class == {0: approx(2 / 3), 5: approx(0.5), 18: 1.0}
    assert r.mAP == approx(13 / 18)
    assert r.n_gt == {0: 3, 5: 1, 18: 1} and r.n_images == 2 and r.n_dropped == 1
    path = tmp_path / "sub.csv"
    write_csv(rows, path)
    assert evaluate(path, truth_dir).mAP == approx(13 / 18)
    assert evaluate(str(path), truth_dir, iou="box").mAP == approx(13 / 18)


def test_evaluate_decodes_only_the_triples_it_scores(truth_dir):
    """A triple of a class not among the image's labels is dropped before its mask is
    decoded: an undecodable mask there costs nothing, while on a scored class it is an error."""
    rows = make_submission()
    width, height, text = rows["img1"]
    rows["img1"] = (width, height, text + " 7 0.5 not-base64!")  # class 7: not among img1's labels
    r = evaluate(rows, truth_dir)
    assert r.mAP == approx(13 / 18) and r.n_dropped == 2
    rows["img1"] = (width, height, text + " 18 0.5 not-base64!")  # class 18: scored, so decoded
    with pytest.raises(SubmissionError, match="img1"):
        evaluate(rows, truth_dir)


def test_evaluate_rejects_size_mismatch(truth_dir):
    rows = make_submission()
    rows["img1"] = (6, 11, rows["img1"][2])  # swapped
    with pytest.raises(SubmissionError, match="img1"):
        evaluate(rows, truth_dir)


def test_evaluate_errors(truth_dir, tmp_path):
    with pytest.raises(TruthError, match="does not exist"):
        evaluate(make_submission(), tmp_path / "nowhere")
    no_height = tmp_path / "no_height.csv"
    no_height.write_text("ID,ImageWidth,PredictionString\nimg1,11,\n")
    with pytest.raises(SubmissionError, match="columns"):
        evaluate(no_height, truth_dir)
    rows = make_submission()
    rows["img1"] = (*rows["img1"][:2], "0 0.9 not-base64!")
    with pytest.raises(SubmissionError, match="img1"):
        evaluate(rows, truth_dir)
    (truth_dir / "labels" / "img2.png").unlink()
    with pytest.raises(TruthError, match="img2.png"):
        evaluate(make_submission(), truth_dir)


def test_cli_prints_table_and_map_last(truth_dir, tmp_path, capsys):
    path = tmp_path / "sub.csv"
    write_csv(make_submission(), path)
    assert main(["--truth", str(truth_dir), str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"mAP {13 / 18:.6f}"
    assert any(line.split()[:2] == ["5", "Nuclear"] and line.endswith("0.500000") for line in out)
    assert main(["--truth", str(truth_dir), "--iou", "box", str(path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"mAP {13 / 18:.6f}"


def test_cli_errors_are_one_line(truth_dir, tmp_path, capsys):
    path = tmp_path / "sub.csv"
    write_csv(make_submission(), path)
    assert main(["--truth", str(tmp_path / "nowhere"), str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nowhere" in err[0]
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,ImageWidth,ImageHeight,PredictionString\nimg1,11,6,0 0.5\n")
    assert main(["--truth", str(truth_dir), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "img1" in err[0]
    assert main(["--truth", str(truth_dir), str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_cli_as_module(truth_dir, tmp_path):
    path = tmp_path / "sub.csv"
    write_csv(make_submission(), path)
    proc = subprocess.run(
        [sys.executable, "-m", "hpa_kernel.tools.metric", "--truth", str(truth_dir), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"mAP {13 / 18:.6f}"
