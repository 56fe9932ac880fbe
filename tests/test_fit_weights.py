"""hpa_kernel.train.fit_weights: local mAP of an OOF table, and the weights it fits."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hpa_kernel.classes import NUM_CLASSES, format_labels
from hpa_kernel.tools.metric import evaluate_arrays
from hpa_kernel.train.fit_weights import class_ap, fit_step_weights, main, match_oof

SIDE = 64


def _truth(root: Path, images: dict[str, tuple[np.ndarray, dict[int, list[int]]]]) -> Path:
    (root / "labels").mkdir(parents=True)
    rows = []
    for iid, (labels, cells) in images.items():
        cv2.imwrite(str(root / "labels" / f"{iid}.png"), labels.astype(np.uint16))
        rows += [(iid, cid, format_labels(cls)) for cid, cls in cells.items()]
    pd.DataFrame(rows, columns=["ID", "cell_id", "Label"]).to_csv(root / "cells.csv", index=False)
    return root


def _quadrants() -> np.ndarray:
    lab = np.zeros((SIDE, SIDE), np.int32)
    h = SIDE // 2
    lab[:h, :h], lab[:h, h:], lab[h:, :h], lab[h:, h:] = 1, 2, 3, 4
    return lab


def _oof(rows: list[dict]) -> pd.DataFrame:
    out = []
    for r in rows:
        d = {"ID": r["ID"], "fold": 0, "cell_id": r["cell_id"], "y0": r["box"][0], "x0": r["box"][1],
             "y1": r["box"][2], "x1": r["box"][3], "width": SIDE, "height": SIDE, "Label": "0"}
        d.update({f"step1_{c}": float(r["s1"][c]) for c in range(NUM_CLASSES)})
        d.update({f"step2_{c}": float(r["s2"][c]) for c in range(NUM_CLASSES)})
        out.append(d)
    return pd.DataFrame(out)


def _known_case(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """Two images; class 0 is ranked right by Step 1 only, class 1 by Step 2 only."""
    cells = {1: [0], 2: [0], 3: [1], 4: [1]}
    truth = _truth(tmp_path / "truth", {"a": (_quadrants(), cells), "b": (_quadrants(), cells)})
    h = SIDE // 2
    boxes = {1: (0, 0, h, h), 2: (0, h, h, SIDE), 3: (h, 0, SIDE, h), 4: (h, h, SIDE, SIDE)}
    rows = []
    for iid, base in (("a", 0.0), ("b", 0.05)):
        for cid in (1, 2, 3, 4):
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            true0, true1 = cid in (1, 2), cid in (3, 4)
            s1[0] = (0.9 if true0 else 0.3) + base
            s2[0] = (0.2 if true0 else 0.8) + base
            s1[1] = (0.2 if true1 else 0.8) + base
            s2[1] = (0.9 if true1 else 0.3) + base
            rows.append({"ID": iid, "cell_id": cid, "box": boxes[cid], "s1": s1, "s2": s2})
    return truth, _oof(rows)


def test_per_class_weights_follow_the_step_that_ranks_right(tmp_path: Path) -> None:
    truth, table = _known_case(tmp_path)
    m = match_oof(table, truth, size=SIDE)
    fit = fit_step_weights(m, grid=21, per_class=True)
    assert fit["mAP"] == pytest.approx(1.0)
    assert fit["step1"][0] > 0.5 and fit["step1"][1] < 0.5  # class 0 trusts Step 1, class 1 Step 2
    assert np.allclose(np.add(fit["step1"], fit["step2"]), 1.0)
    # each class's AP is perfect at its fitted weight and worse at the other extreme
    assert class_ap(m.s1[:, 0], m.present[:, 0], m.gt_key[:, 0], m.n_gt[0]) == pytest.approx(1.0)
    assert class_ap(m.s2[:, 0], m.present[:, 0], m.gt_key[:, 0], m.n_gt[0]) < 0.9
    common = fit_step_weights(m, grid=21, per_class=False)
    assert isinstance(common["step1"], float) and common["mAP"] < fit["mAP"]


def test_a_pair_is_fitted_when_one_step_is_right_for_every_class(tmp_path: Path) -> None:
    truth, table = _known_case(tmp_path)
    right = table["step2_1"].copy()  # class 1 now ranked right by Step 1 and wrong by Step 2
    table["step1_1"], table["step2_1"] = right, 1.1 - right
    fit = fit_step_weights(match_oof(table, truth, size=SIDE), grid=11)
    assert fit["step1"] > 0.5 and fit["mAP"] == pytest.approx(1.0) and fit["mAP"] > fit["mAP_default"]


def test_local_map_equals_the_metric_with_box_iou(tmp_path: Path) -> None:
    """Random scores, boxes shifted off the truth (some below IoU 0.6), a scaled box frame:
    the fitted table's mAP at any weight is hpa_kernel.metric's box mAP."""
    rng = np.random.default_rng(0)
    images, rows, preds = {}, [], {}
    h = SIDE // 2
    for k in range(4):
        iid = f"im{k}"
        cells = {cid: sorted(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist()) for cid in (1, 2, 3, 4)}
        images[iid] = (_quadrants(), cells)
        dets = []
        for cid, (y, x) in zip((1, 2, 3, 4), ((0, 0), (0, h), (h, 0), (h, h))):
            dy, dx = (int(v) for v in rng.integers(-12, 13, 2) // 2 * 2)
            box = np.clip([y + dy, x + dx, y + h + dy, x + h + dx], 0, SIDE)
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            s1[:5] = rng.random(5).round(2)
            s2[:5] = rng.random(5).round(2)
            rows.append({"ID": iid, "cell_id": cid, "box": tuple(int(v) // 2 for v in box), "s1": s1, "s2": s2})
            mask = np.zeros((SIDE, SIDE), bool)
            mask[box[0] : box[2], box[1] : box[3]] = True
            dets.append((mask, s1, s2))
        preds[iid] = dets
    truth = _truth(tmp_path / "truth", images)
    m = match_oof(_oof(rows), truth, size=SIDE // 2)  # boxes given in a half-size frame
    classes = np.flatnonzero(m.n_gt)
    for w1 in (0.0, 0.3, 1.0):
        ours = np.mean([class_ap(w1 * m.s1[:, c] + (1 - w1) * m.s2[:, c], m.present[:, c], m.gt_key[:, c], m.n_gt[c])
                        for c in classes])
        detections = {
            iid: [(c, float(w1 * s1[c] + (1 - w1) * s2[c]), mask) for mask, s1, s2 in dets for c in range(NUM_CLASSES)
                  if w1 * s1[c] + (1 - w1) * s2[c] > 0]
            for iid, dets in preds.items()
        }
        ref = evaluate_arrays({i: images[i] for i in images}, detections, iou="box")
        assert ours == pytest.approx(ref.mAP, abs=1e-12)


def test_cli_writes_a_manifest_copy_with_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth, table = _known_case(tmp_path)
    oof = tmp_path / "oof.csv"
    table.to_csv(oof, index=False)
    manifest = tmp_path / "in.json"
    manifest.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "step_weights": {"step1": 0.5, "step2": 0.5},
                                    "top_classes": 18}))
    out = tmp_path / "out" / "manifest.json"
    assert main(["--oof", str(oof), "--truth", str(truth), "--manifest", str(manifest), "--out", str(out),
                 "--size", str(SIDE), "--per-class"]) == 0
    written = json.loads(out.read_text())
    assert written["top_classes"] == 18 and written["classifiers"] == [{"path": "m.pt"}]
    assert len(written["step_weights"]["step1"]) == NUM_CLASSES and written["step_weights"]["step1"][0] > 0.5
    record = json.loads(out.with_suffix(".fit.json").read_text())
    assert record["mAP"] == pytest.approx(1.0) and record["images"] == 2
    assert "local box mAP 1.0000" in capsys.readouterr().out


def test_missing_column_is_one_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    truth, table = _known_case(tmp_path)
    oof = tmp_path / "oof.csv"
    table.drop(columns=["step2_3"]).to_csv(oof, index=False)
    manifest = tmp_path / "in.json"
    manifest.write_text("{}")
    assert main(["--oof", str(oof), "--truth", str(truth), "--manifest", str(manifest),
                 "--out", str(tmp_path / "o.json")]) == 2
    assert "lacks column(s) step2_3" in caplog.text and not (tmp_path / "o.json").exists()


def _image_label_case() -> pd.DataFrame:
    """Four images with image labels only (0, 1, 0, 1), two cells each: Step 1 ranks the
    images right for both classes, Step 2 wrong; true ensembled scores pass the false
    ones only for w1 > 0.5."""
    rows, labels = [], {"a": "0", "b": "1", "c": "0", "d": "1"}
    h = SIDE // 2
    for iid, label in labels.items():
        for cid, box in ((1, (0, 0, h, h)), (2, (h, h, SIDE, SIDE))):
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            for c in (0, 1):
                right = str(c) == label
                s1[c], s2[c] = (0.9, 0.2) if right else (0.3, 0.8)
            rows.append({"ID": iid, "cell_id": cid, "box": box, "s1": s1 - 0.01 * cid, "s2": s2 - 0.01 * cid})
    table = _oof(rows)
    table["Label"] = table["ID"].map(labels)
    return table


@pytest.mark.parametrize("objective", ["images", "single-label-cells"])
def test_image_labels_only_fit_what_ranks_the_images_right(objective: str) -> None:
    """Real training data has image labels only: the fit must still tell a step that ranks
    the images right from one that ranks them wrong (it used to score 1.0 at every weight)."""
    m = match_oof(_image_label_case(), objective=objective)
    fit = fit_step_weights(m, grid=21)
    assert not fit["flat"] and fit["step1"] > 0.5
    assert fit["mAP"] == pytest.approx(1.0) and fit["mAP"] > fit["mAP_default"]
    assert list(m.classes()) == [0, 1]


def test_the_image_objective_is_the_metrics_ap_of_each_images_best_cell() -> None:
    from hpa_kernel.tools.metric import average_precision

    table = _image_label_case()
    m = match_oof(table, objective="images")
    for w1 in (0.0, 0.3, 0.8):
        ens = w1 * table[[f"step1_{c}" for c in range(NUM_CLASSES)]].to_numpy() + (1 - w1) * table[
            [f"step2_{c}" for c in range(NUM_CLASSES)]].to_numpy()
        best = pd.DataFrame(ens).groupby(table["ID"].to_numpy()).max().to_numpy()  # images in sorted ID order
        truth = np.array([[lab == str(c) for c in range(NUM_CLASSES)] for lab in ["0", "1", "0", "1"]])
        want = [average_precision(best[:, c], truth[:, c], int(truth[:, c].sum())) for c in (0, 1)]
        assert m.class_aps(w1, np.array([0, 1])) == pytest.approx(want, abs=1e-12)


def _manifest(tmp_path: Path) -> Path:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "step_weights": {"step1": 0.5, "step2": 0.5}}))
    return manifest


def test_a_flat_objective_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          caplog: pytest.LogCaptureFixture) -> None:
    table = _image_label_case()
    for c in range(NUM_CLASSES):
        table[f"step2_{c}"] = table[f"step1_{c}"]  # both steps the same: every weight ranks alike
    table.to_csv(tmp_path / "oof.csv", index=False)
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()
    assert main(["--oof", str(tmp_path / "oof.csv"), "--manifest", str(manifest)]) == 0
    assert manifest.read_bytes() == before and not (tmp_path / "manifest.fit.json").exists()
    assert "nothing fitted: the objective is flat" in capsys.readouterr().out
    assert "the objective is flat" in caplog.text


def test_a_wrong_size_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    truth, table = _known_case(tmp_path)
    table.to_csv(tmp_path / "oof.csv", index=False)
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()
    for size, needle in ((SIDE // 2, f"reach {SIDE} px"), (SIDE * 4, f"reach only {SIDE} px")):
        assert main(["--oof", str(tmp_path / "oof.csv"), "--truth", str(truth), "--manifest", str(manifest),
                     "--size", str(size)]) == 2
        assert f"--size {size}: the OOF table's boxes {needle}" in caplog.text
    assert manifest.read_bytes() == before


@pytest.mark.parametrize("spoil, needle", [
    ("nan", "all NaN or infinite"),
    ("some nan", "1 of 8 OOF cells have NaN"),
    ("one class", "truth for class(es) 0 (Nucleoplasm) only"),
    ("empty", "has no cells"),
])
def test_tables_that_cannot_be_fitted_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: str,
                                                  needle: str) -> None:
    table = _image_label_case()
    cols = [c for c in table.columns if c.startswith("step")]
    if spoil == "nan":
        table[cols] = np.nan
    elif spoil == "some nan":
        table.loc[3, "step2_4"] = np.nan
    elif spoil == "one class":
        table["Label"] = "0"
    else:
        table = table.iloc[:0]
    table.to_csv(tmp_path / "oof.csv", index=False)
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()
    assert main(["--oof", str(tmp_path / "oof.csv"), "--manifest", str(manifest)]) == 2
    assert needle in caplog.text and "mAP 0.0000" not in caplog.text
    assert manifest.read_bytes() == before


def test_the_manifest_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies before its write is complete (here: the final rename fails) leaves
    the old manifest whole, never a truncated one."""
    import os

    _image_label_case().to_csv(tmp_path / "oof.csv", index=False)
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    assert main(["--oof", str(tmp_path / "oof.csv"), "--manifest", str(manifest)]) == 2
    assert manifest.read_bytes() == before
    monkeypatch.undo()
    assert main(["--oof", str(tmp_path / "oof.csv"), "--manifest", str(manifest)]) == 0
    assert json.loads(manifest.read_text())["step_weights"]["step1"] > 0.5


def test_the_written_manifest_loads_with_the_fitted_weights(tmp_path: Path) -> None:
    from hpa_kernel.config import load_config

    truth, table = _known_case(tmp_path)
    oof = tmp_path / "oof.csv"
    table.to_csv(oof, index=False)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"step_weights": {"step1": 0.5, "step2": 0.5}, "step1": {"cam": "minmax"}}))
    assert main(["--oof", str(oof), "--truth", str(truth), "--manifest", str(manifest), "--size", str(SIDE),
                 "--per-class"]) == 0
    cfg = load_config(manifest)  # rewritten in place
    assert cfg.cam_norm == "minmax" and len(cfg.step1_weight) == NUM_CLASSES
    assert cfg.step1_weight[0] > 0.5 > cfg.step1_weight[1]
    assert (tmp_path / "manifest.fit.json").is_file()
