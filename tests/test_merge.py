"""Merging predictions by cell: decoding, matching, combining, and the merge CLI."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from hpa_kernel.stages.cellmatch import RankTable, combine_scores, contingency, iou_matrix, match_cells, merge_cells
from hpa_kernel.formats.cells import CellsWriter
from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.team_merge import main as merge_main
from hpa_kernel.formats.rle import decode_mask, encode_label_image, encode_mask
from hpa_kernel.formats.submission import (
    COLUMNS,
    format_confidence,
    prediction_string,
    read_submission,
    validate_submission,
    write_submission,
)
from hpa_kernel.formats.submission_cells import decode_label_image, row_cells
from hpa_kernel.tools.synthetic import make_image

SIZE = 384


# ------------------------------------------------------------------ helpers (test oracles)


def _shift(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``labels`` moved by (dy, dx) px, zero-filled (no wrap-around)."""
    out = np.zeros_like(labels)
    h, w = labels.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = labels[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _scores(rng: np.random.Generator, n: int) -> np.ndarray:
    s = np.round(rng.random((n, NUM_CLASSES)), 4)  # 4 digits: written and read back exactly
    s[s < 0.6] = 0  # a few classes per cell, as a pipeline writes
    return s


def _pred(labels: np.ndarray, scores: np.ndarray, width: int, height: int) -> str:
    ids = np.unique(labels[labels > 0])
    return prediction_string(encode_label_image(labels, width, height, cell_ids=ids), ids, scores)


def _parse(text: str) -> dict[str, dict[int, float]]:
    """PredictionString -> {mask string: {class: confidence}}."""
    out: dict[str, dict[int, float]] = {}
    t = text.split()
    for c, v, m in zip(t[0::3], t[1::3], t[2::3]):
        out.setdefault(m, {})[int(c)] = float(v)
    return out


@pytest.fixture(scope="module")
def images():
    """Three synthetic label images (original size) with per-cell scores."""
    out = []
    for k in range(3):
        img = make_image(np.random.default_rng([9100, k]), SIZE, SIZE)
        labels = img.cell_labels
        n = int(labels.max())
        out.append((f"img{k}", labels, _scores(np.random.default_rng(k), n)))
    return out


def _write(path, images, sample_ids=None, transform=None):
    rows = {}
    for image_id, labels, scores in images:
        lab, sc = (labels, scores) if transform is None else transform(labels, scores)
        rows[image_id] = (SIZE, SIZE, _pred(lab, sc, SIZE, SIZE))
    write_submission(rows, sample_ids or list(rows), path)
    return path


@pytest.fixture()
def sample(tmp_path, images):
    p = tmp_path / "sample_submission.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for image_id, _, _ in images:
            w.writerow((image_id, SIZE, SIZE, ""))
        w.writerow(("nocells", SIZE, SIZE, ""))
    return p


# ------------------------------------------------------------------ decoding


def test_decode_label_image_matches_decode_mask():
    rng = np.random.default_rng(0)
    h, w = 37, 23  # non-square
    masks = [rng.random((h, w)) < p for p in (0.1, 0.3, 0.5)]
    masks.append(np.ones((h, w), bool))
    texts = [encode_mask(m) for m in masks]
    labels, areas = decode_label_image(texts, h, w)
    assert labels.shape == (h, w)
    assert areas.tolist() == [int(m.sum()) for m in masks]
    expected = np.zeros((h, w), np.int32)
    for i in range(len(masks) - 1, -1, -1):  # overlapping: the first listed wins
        expected[decode_mask(texts[i], h, w)] = i + 1
    np.testing.assert_array_equal(labels, expected)


def test_decode_label_image_disjoint_cells(images):
    _, labels, _ = images[0]
    rles = encode_label_image(labels, SIZE, SIZE)
    decoded, areas = decode_label_image(list(rles.values()), SIZE, SIZE)
    ids = np.array(list(rles))
    np.testing.assert_array_equal(np.where(decoded > 0, ids[decoded - 1], 0), labels)
    np.testing.assert_array_equal(areas, np.bincount(labels.ravel())[ids])


def test_decode_label_image_names_a_bad_string():
    with pytest.raises(ValueError, match="mask 1"):
        decode_label_image([encode_mask(np.ones((4, 4), bool)), "not-base64!"], 4, 4)


def test_row_cells_dedupes_masks_and_keeps_classes():
    a = np.zeros((6, 5), bool)
    a[1:3, 1:4] = True
    b = np.zeros((6, 5), bool)
    b[4:, :2] = True
    ma, mb = encode_mask(a), encode_mask(b)
    text = f"0 0.5 {ma} 3 0.25 {ma} 2 0.75 {mb} 3 0.125 {ma}"
    cells = row_cells(text, 5, 6)
    assert cells.masks == [ma, mb]
    assert cells.scores[0, [0, 3]].tolist() == [0.5, 0.25]  # class 3 twice: the highest kept
    assert cells.scores[1, 2] == 0.75 and cells.scores.sum() == pytest.approx(1.5)
    assert cells.areas.tolist() == [6, 4]
    np.testing.assert_array_equal(cells.labels, a * 1 + b * 2)


# ------------------------------------------------------------------ matching


def test_contingency_and_iou_against_pairwise_oracle():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (30, 40))
    b = rng.integers(0, 7, (30, 40))
    table = contingency(a, b)
    for i in range(5):
        for j in range(7):
            assert table[i, j] == np.sum((a == i) & (b == j))
    iou = iou_matrix(a, b)
    for i in range(1, 5):
        for j in range(1, 7):
            ma, mb = a == i, b == j
            assert iou[i - 1, j - 1] == pytest.approx((ma & mb).sum() / (ma | mb).sum())
    # the same numbers whatever the memory order
    np.testing.assert_array_equal(contingency(np.asfortranarray(a), np.asfortranarray(b)), table)
    np.testing.assert_array_equal(contingency(np.asfortranarray(a), b), table)


def test_shifted_masks_match_every_cell(images):
    _, labels, _ = images[0]
    moved = _shift(labels, 3, 3)
    ia, ib, iou = match_cells(labels, moved)
    n = int(labels.max())
    assert ia.tolist() == list(range(n)) and ib.tolist() == list(range(n))  # every cell, to itself
    assert 0.75 < np.median(iou) < 0.9  # IoU about 0.8


def test_match_is_one_to_one_with_a_low_threshold():
    a = np.zeros((10, 20), np.int32)
    a[:, :10], a[:, 10:] = 1, 2
    b = np.zeros((10, 20), np.int32)
    b[:, :12] = 1  # IoU 10/12 with a1, 2/20 with a2
    b[:, 12:] = 2  # IoU 8/10 with a2
    ia, ib, iou = match_cells(a, b, iou_threshold=0.05)
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 0), (1, 1)]
    assert match_cells(a, b, iou_threshold=0.85)[0].size == 0


def test_combine_scores_zero_and_take():
    s = np.zeros((2, 2, NUM_CLASSES))
    s[0, 0, 1], s[0, 1, 1] = 0.9, 0.3
    s[1, 0, 1] = 0.6
    present = np.array([[True, True], [True, False]])
    zero = combine_scores(s, present, [2, 1], "zero")
    take = combine_scores(s, present, [2, 1], "take")
    assert zero[0, 1] == pytest.approx((2 * 0.9 + 0.3) / 3) == take[0, 1]
    assert zero[1, 1] == pytest.approx(2 * 0.6 / 3)
    assert take[1, 1] == pytest.approx(0.6)


def test_merge_cells_three_inputs_take_adds_each_extra_cell_once():
    ref = np.zeros((10, 30), np.int32)
    ref[:, :10] = 1
    other = ref.copy()
    other[:, 20:] = 2  # a cell the reference lacks
    s = [np.full((1, NUM_CLASSES), 0.2), np.full((2, NUM_CLASSES), 0.4), np.full((2, NUM_CLASSES), 0.8)]
    m = merge_cells([ref, other, other.copy()], s, unmatched="take")
    assert m.source.tolist() == [0, 1] and m.cell.tolist() == [0, 1]
    assert m.members.tolist() == [[0, 0, 0], [-1, 1, 1]]
    assert m.scores[:, 0] == pytest.approx([(0.2 + 0.4 + 0.8) / 3, (0.4 + 0.8) / 2])
    z = merge_cells([ref, other, other.copy()], s, unmatched="zero")
    assert z.source.tolist() == [0]


def test_rank_table():
    t = RankTable.fit([np.array([[0.1] + [0] * 18, [0.3] + [0] * 18]), np.array([[0.2] + [0.5] * 18])])
    out = t.transform(np.array([[0.2] + [0] * 18, [0.05] + [0.5] * 18]))
    assert out[:, 0].tolist() == pytest.approx([2 / 3, 0.0])
    assert out[0, 1:].tolist() == [0.0] * 18 and out[1, 1:].tolist() == [1.0] * 18


# ------------------------------------------------------------------ the CLI


def _merge(*args) -> int:
    return merge_main([str(a) for a in args] + ["--no-progress", "-q"])


def test_merging_a_submission_with_itself_gives_the_same_file(tmp_path, images, sample):
    ids = [i for i, _, _ in images] + ["nocells"]
    sub = tmp_path / "ours.csv"
    rows = {}
    for k, (image_id, labels, _) in enumerate(images):
        s = np.random.default_rng(k).random((int(labels.max()), NUM_CLASSES)).astype(np.float32)  # as the pipeline's
        s[s < 0.5] = 0
        rows[image_id] = (SIZE, SIZE, _pred(labels, s, SIZE, SIZE))
    rows["nocells"] = (SIZE, SIZE, "")
    write_submission(rows, ids, sub)
    for weights in ("1,1", "1,0.3"):
        out = tmp_path / f"merged_{weights}.csv"
        assert _merge(sub, sub, "--sample", sample, "--out", out, "--weights", weights) == 0
        assert out.read_bytes() == sub.read_bytes()
    out = tmp_path / "merged_take.csv"
    assert _merge(sub, sub, sub, "--sample", sample, "--out", out, "--unmatched", "take") == 0
    assert out.read_bytes() == sub.read_bytes()


def test_shifted_submission_merges_every_cell_with_weights(tmp_path, images, sample):
    ours = _write(tmp_path / "ours.csv", images)
    other_scores = {}

    def shifted(labels, scores):
        s = _scores(np.random.default_rng(int(labels.max())), int(labels.max()))
        other_scores[int(labels.max())] = s
        return _shift(labels, 3, 3), s

    theirs = _write(tmp_path / "theirs.csv", images, transform=shifted)
    out = tmp_path / "merged.csv"
    assert _merge(ours, theirs, "--sample", sample, "--out", out, "--weights", "1,0.5") == 0
    merged, a_rows, b_rows = read_submission(out), read_submission(ours), read_submission(theirs)
    assert list(merged) == [i for i, _, _ in images] + ["nocells"]  # every ID, sample order
    for image_id, labels, scores in images:
        got = _parse(merged[image_id][2])
        rles = encode_label_image(labels, SIZE, SIZE)
        assert set(got) <= set(rles.values())  # masks from the reference (input 0)
        theirs_s = other_scores[int(labels.max())]
        expected = (1.0 * scores + 0.5 * theirs_s) / 1.5
        n_cells = 0
        for k, (cid, mask) in enumerate(rles.items()):
            want = {c: format_confidence(v) for c, v in enumerate(expected[k]) if v > 0}
            have = {c: format_confidence(v) for c, v in got.get(mask, {}).items()}
            assert have == want, f"cell {cid}"
            n_cells += bool(want)
        assert n_cells == len(got)
    # the other input as reference: its masks are used
    out2 = tmp_path / "merged_ref1.csv"
    assert _merge(ours, theirs, "--sample", sample, "--out", out2, "--reference", "1") == 0
    for image_id in a_rows:
        assert set(_parse(read_submission(out2)[image_id][2])) <= set(_parse(b_rows[image_id][2]))


def test_cell_in_one_input_only_zero_or_take(tmp_path, images, sample):
    image_id, labels, scores = images[0]
    n = int(labels.max())
    lone = n  # the last cell exists only in "ours"; "theirs" has an extra cell instead
    theirs_labels = labels.copy()
    theirs_labels[theirs_labels == lone] = 0
    extra = np.zeros_like(labels)
    extra[:4, :4] = 1  # tiny new cell, drawn over whatever was there
    theirs_labels[extra > 0] = n + 1
    kept_ids = np.unique(theirs_labels[theirs_labels > 0])
    theirs_scores = np.full((kept_ids.size, NUM_CLASSES), 0.0, np.float32)
    theirs_scores[:, 5] = 0.5
    ours_s = scores.copy()
    ours_s[:, 5] = 0.25
    ours = tmp_path / "ours.csv"
    theirs = tmp_path / "theirs.csv"
    write_submission({image_id: (SIZE, SIZE, _pred(labels, ours_s, SIZE, SIZE))}, [image_id], ours)
    write_submission({image_id: (SIZE, SIZE, prediction_string(
        encode_label_image(theirs_labels, SIZE, SIZE), kept_ids, theirs_scores))}, [image_id], theirs)
    lone_mask = encode_label_image(labels, SIZE, SIZE, cell_ids=[lone])[lone]
    extra_mask = encode_mask(extra > 0)

    out = tmp_path / "zero.csv"
    assert _merge(ours, theirs, "--sample", sample, "--out", out) == 0
    got = _parse(read_submission(out)[image_id][2])
    assert extra_mask not in got  # zero: only the reference's cells
    assert got[lone_mask][5] == pytest.approx(0.25 / 2, rel=1e-5)  # 0 from the input without it
    assert len(got) == n

    out = tmp_path / "take.csv"
    assert _merge(ours, theirs, "--sample", sample, "--out", out, "--unmatched", "take") == 0
    got = _parse(read_submission(out)[image_id][2])
    assert got[lone_mask][5] == pytest.approx(0.25, rel=1e-5)  # taken from the input that has it
    assert got[extra_mask] == {5: 0.5}  # the extra cell, its mask and score from "theirs"
    assert len(got) == n + 1


def test_every_id_keeps_its_row_despite_bad_inputs(tmp_path, images, sample, caplog):
    ours = _write(tmp_path / "ours.csv", images)
    rows = read_submission(ours)
    partial = tmp_path / "partial.csv"  # lacks img1, a wrong size for img2, a bad mask in img0
    bad0 = rows["img0"][2].rsplit(" ", 1)[0] + " AAAA"
    write_submission({"img0": (SIZE, SIZE, bad0), "img2": (SIZE + 1, SIZE, rows["img2"][2])}, ["img0", "img2"], partial)
    out = tmp_path / "merged.csv"
    assert _merge(ours, partial, "--sample", sample, "--out", out, "--unmatched", "take") == 0
    merged = read_submission(out)
    assert list(merged) == ["img0", "img1", "img2", "nocells"]
    assert validate_submission(out, sample) == []
    assert merged["img1"] == rows["img1"] and merged["img2"] == rows["img2"]  # "take": ours alone
    assert merged["nocells"] == (SIZE, SIZE, "")
    assert len(_parse(merged["img0"][2])) == len(_parse(rows["img0"][2]))  # the bad cell dropped, the rest merged


def test_rank_mean_keeps_the_order_of_a_self_merge(tmp_path, images, sample):
    ours = _write(tmp_path / "ours.csv", images)
    out = tmp_path / "rank.csv"
    assert _merge(ours, ours, "--sample", sample, "--out", out, "--mean", "rank") == 0
    a, b = read_submission(ours), read_submission(out)
    for image_id in a:
        pa, pb = _parse(a[image_id][2]), _parse(b[image_id][2])
        assert list(pa) == list(pb)
        for c in range(NUM_CLASSES):
            va = [pa[m].get(c, 0) for m in pa]
            vb = [pb[m].get(c, 0) for m in pb]
            assert np.array_equal(np.argsort(va, kind="stable"), np.argsort(vb, kind="stable"))
            assert all(0 < v <= 1 for v in vb if v)


def test_cells_folder_input_equals_its_submission(tmp_path, images, sample):
    """An export folder at a working size below the original merges like the submission
    the pipeline would write from it."""
    small = 128
    import cv2

    folder = tmp_path / "cells"
    rows = {}
    with CellsWriter(folder, models=["m0"]) as w:
        for image_id, labels, scores in images:
            lab = cv2.resize(labels.astype(np.uint16), (small, small), interpolation=cv2.INTER_NEAREST)
            ids = np.unique(lab[lab > 0])
            sc = scores[ids - 1]
            w.write_image(image_id, lab, (SIZE, SIZE), ids, sc, {"m0": {"ens": sc}})
            rows[image_id] = (SIZE, SIZE, prediction_string(encode_label_image(lab, SIZE, SIZE, cell_ids=ids), ids, sc))
    sub = tmp_path / "sub.csv"
    write_submission(rows, list(rows), sub)
    out_a, out_b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _merge(folder, "--sample", sample, "--out", out_a) == 0
    assert _merge(sub, "--sample", sample, "--out", out_b) == 0
    assert out_a.read_bytes() == out_b.read_bytes()
    for image_id in rows:
        assert read_submission(out_a)[image_id] == rows[image_id]
    assert _merge(folder, sub, "--sample", sample, "--out", out_a) == 0  # mixed kinds
    assert read_submission(out_a) == read_submission(out_b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "1"], "weights: 1 given for 2"),
        (["--weights", "1,x"], "--weights wants"),
        (["--iou", "0"], "iou: must be in"),
        (["--reference", "2"], "reference: must be in 0..1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, images, sample, extra, message, capsys):
    ours = _write(tmp_path / "ours.csv", images)
    argv = [str(ours), str(ours), "--sample", str(sample), "--out", str(tmp_path / "o.csv"), *extra]
    try:
        rc = merge_main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "o.csv").exists()


def test_missing_input_exits_2(tmp_path, sample):
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.team_merge", str(tmp_path / "nope.csv"), "--sample", str(sample),
                        "--out", str(tmp_path / "o.csv"), "-q"], capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
