"""hpa_kernel.train.fit_weights: the metric's mAP of a per-cell export, and the weights it fits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import KernelConfig
from hpa_kernel.formats.cells import CellsWriter
from hpa_kernel.formats.truth import write_label_image, write_truth_index
from hpa_kernel.stages.ensemble import combine_steps, select_top_classes
from hpa_kernel.stages.labels import resize_labels
from hpa_kernel.tools.metric import evaluate_arrays
from hpa_kernel.train.fit_weights import class_ap, fit_step_weights, main, match_oof, read_oof
from hpa_kernel.train.oof import IMAGE_COLS, write_image_table

SIDE = 64


def _truth(root: Path, images: dict[str, tuple[np.ndarray, dict[int, list[int]]]]) -> Path:
    for iid, (labels, _) in images.items():
        write_label_image(root, iid, labels)
    write_truth_index(root, {iid: cells for iid, (_, cells) in images.items()})
    return root


def _quadrants(side: int = SIDE) -> np.ndarray:
    lab = np.zeros((side, side), np.int32)
    h = side // 2
    lab[:h, :h], lab[:h, h:], lab[h:, :h], lab[h:, h:] = 1, 2, 3, 4
    return lab


def _export(folder: Path, images: dict, labels: dict[str, str] | None = None) -> Path:
    """A per-cell export as train.oof writes it: ``images[ID] = (label image at the working
    size, (width, height), {cell_id: (step1 (19,), step2 (19,))})``; ``labels``: oof_images.csv."""
    with CellsWriter(folder, models=["m0"], resume=False) as w:
        for iid, (lab, size, cells) in images.items():
            ids = np.array(sorted(cells))
            s1 = np.array([cells[c][0] for c in ids], np.float32).reshape(-1, NUM_CLASSES)
            s2 = np.array([cells[c][1] for c in ids], np.float32).reshape(-1, NUM_CLASSES)
            ens = combine_steps(s1, s2)
            w.write_image(iid, lab, size, ids, select_top_classes(ens), {"m0": {"step1": s1, "step2": s2, "ens": ens}})
    if labels is not None:
        write_image_table(folder, pd.DataFrame([[i, 0, lab, *[0.5] * NUM_CLASSES] for i, lab in labels.items()],
                                               columns=["ID", "fold", "Label", *IMAGE_COLS]))
    return folder


def _known_case(tmp_path: Path) -> tuple[Path, Path]:
    """Two images; class 0 is ranked right by Step 1 only, class 1 by Step 2 only."""
    cells = {1: [0], 2: [0], 3: [1], 4: [1]}
    truth = _truth(tmp_path / "truth", {"a": (_quadrants(), cells), "b": (_quadrants(), cells)})
    images = {}
    for iid, base in (("a", 0.0), ("b", 0.05)):
        scored = {}
        for cid in (1, 2, 3, 4):
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            true0, true1 = cid in (1, 2), cid in (3, 4)
            s1[0], s2[0] = (0.9 if true0 else 0.3) + base, (0.2 if true0 else 0.8) + base
            s1[1], s2[1] = (0.2 if true1 else 0.8) + base, (0.9 if true1 else 0.3) + base
            scored[cid] = (s1, s2)
        images[iid] = (_quadrants(SIDE // 2), (SIDE, SIDE), scored)  # labels at half the original size
    return truth, _export(tmp_path / "oof", images)


def test_per_class_weights_follow_the_step_that_ranks_right(tmp_path: Path) -> None:
    truth, oof = _known_case(tmp_path)
    m = match_oof(read_oof([oof]), truth)
    fit = fit_step_weights(m, grid=21, per_class=True)
    assert fit["mAP"] == pytest.approx(1.0)
    assert fit["step1"][0] > 0.5 and fit["step1"][1] < 0.5  # class 0 trusts Step 1, class 1 Step 2
    assert np.allclose(np.add(fit["step1"], fit["step2"]), 1.0)
    s1, s2 = m.scores.steps[0]
    assert class_ap(s1[:, 0], m.present[:, 0], m.gt_key[:, 0], m.n_gt[0]) == pytest.approx(1.0)
    assert class_ap(s2[:, 0], m.present[:, 0], m.gt_key[:, 0], m.n_gt[0]) < 0.9
    common = fit_step_weights(m, grid=21, per_class=False)
    assert isinstance(common["step1"], float) and common["mAP"] < fit["mAP"]


def test_local_map_equals_the_metric_on_the_kernels_masks(tmp_path: Path) -> None:
    """Random scores, predicted cells shifted off the truth (some below IoU 0.6), labels at half
    the original size, a top-3 class cut: at any weight the fit's mAP is tools.metric's mAP
    of the submission the kernel would write (masks scaled up, the class selection per image)."""
    rng = np.random.default_rng(0)
    truth_images, images, half = {}, {}, SIDE // 2
    for k in range(4):
        iid = f"im{k}"
        truth_images[iid] = (_quadrants(), {c: sorted(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
                                            for c in (1, 2, 3, 4)})
        pred = np.roll(_quadrants(half), tuple(int(v) for v in rng.integers(-3, 4, 2)), axis=(0, 1))
        scored = {}
        for cid in (1, 2, 3, 4):
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            s1[:5], s2[:5] = rng.random(5).round(2), rng.random(5).round(2)
            scored[cid] = (s1, s2)
        images[iid] = (pred, (SIDE, SIDE), scored)
    truth = _truth(tmp_path / "truth", truth_images)
    config = KernelConfig(top_classes=3)
    m = match_oof(read_oof([_export(tmp_path / "oof", images)]), truth, config=config)
    classes, seen = m.classes(), set()
    for w1 in (0.0, 0.3, 1.0):
        detections = {}
        for iid, (pred, _, scored) in images.items():
            big = resize_labels(pred, SIDE, SIDE)
            ids = sorted(scored)
            final = select_top_classes(combine_steps(np.array([scored[c][0] for c in ids]),
                                                     np.array([scored[c][1] for c in ids]), w1, 1 - w1), top_n=3)
            detections[iid] = [(c, float(final[i, c]), big == cid) for i, cid in enumerate(ids)
                               for c in range(NUM_CLASSES) if final[i, c] > 0]
        ref = evaluate_arrays(truth_images, detections, iou="mask")
        assert m.class_aps(w1, 1 - w1, classes).mean() == pytest.approx(ref.mAP, abs=1e-12)
        assert 0 < ref.mAP < 1 and ref.n_dropped > 0  # misses, hits and dropped classes alike
        seen.add(round(ref.mAP, 9))
    assert len(seen) == 3  # the weights change the ranking


def test_cli_writes_a_manifest_copy_with_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    truth, oof = _known_case(tmp_path)
    manifest = tmp_path / "in.json"
    manifest.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "step_weights": {"step1": 0.5, "step2": 0.5},
                                    "top_classes": 18}))
    out = tmp_path / "out" / "manifest.json"
    assert main(["--oof", str(oof), "--truth", str(truth), "--manifest", str(manifest), "--out", str(out),
                 "--per-class"]) == 0
    written = json.loads(out.read_text())
    assert written["top_classes"] == 18 and written["classifiers"] == [{"path": "m.pt"}]
    assert len(written["step_weights"]["step1"]) == NUM_CLASSES and written["step_weights"]["step1"][0] > 0.5
    record = json.loads(out.with_suffix(".fit.json").read_text())
    assert record["mAP"] == pytest.approx(1.0) and record["images"] == 2
    assert "local mAP 1.0000" in capsys.readouterr().out


def _image_label_case(tmp_path: Path, same_steps: bool = False) -> Path:
    """Four images with image labels only (0, 1, 0, 1), two cells each: Step 1 ranks the
    images right for both classes, Step 2 wrong; true ensembled scores pass the false
    ones only for w1 > 0.5."""
    labels, images = {"a": "0", "b": "1", "c": "0", "d": "1"}, {}
    for iid, label in labels.items():
        scored = {}
        for cid in (1, 2):
            s1, s2 = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
            for c in (0, 1):
                s1[c], s2[c] = (0.9, 0.2) if str(c) == label else (0.3, 0.8)
            scored[cid] = (s1 - 0.01 * cid, (s1 if same_steps else s2) - 0.01 * cid)
        lab = np.zeros((SIDE, SIDE), np.int32)
        lab[: SIDE // 2], lab[SIDE // 2 :] = 1, 2
        images[iid] = (lab, (SIDE, SIDE), scored)
    return _export(tmp_path / "oof", images, labels)


@pytest.mark.parametrize("objective", ["images", "single-label-cells"])
def test_image_labels_only_fit_what_ranks_the_images_right(tmp_path: Path, objective: str) -> None:
    """Real training data has image labels only: the fit must still tell a step that ranks
    the images right from one that ranks them wrong."""
    m = match_oof(read_oof([_image_label_case(tmp_path)]), objective=objective)
    fit = fit_step_weights(m, grid=21)
    assert not fit["flat"] and fit["step1"] > 0.5
    assert fit["mAP"] == pytest.approx(1.0) and fit["mAP"] > fit["mAP_default"]
    assert list(m.classes()) == [0, 1]


def test_the_image_objective_is_the_metrics_ap_of_each_images_best_cell(tmp_path: Path) -> None:
    from hpa_kernel.formats.cells import scores
    from hpa_kernel.tools.metric import average_precision

    table = read_oof([_image_label_case(tmp_path)])
    m = match_oof(table, objective="images")
    for w1 in (0.0, 0.3, 0.8):
        ens = w1 * scores(table, "m0", "step1").astype(np.float64) + (1 - w1) * scores(table, "m0", "step2")
        best = pd.DataFrame(ens).groupby(table["ID"].to_numpy()).max().to_numpy()  # images in sorted ID order
        truth = np.array([[lab == str(c) for c in range(NUM_CLASSES)] for lab in ["0", "1", "0", "1"]])
        want = [average_precision(best[:, c], truth[:, c], int(truth[:, c].sum())) for c in (0, 1)]
        assert m.class_aps(w1, 1 - w1, np.array([0, 1])) == pytest.approx(want, abs=1e-6)


def _manifest(tmp_path: Path) -> Path:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "step_weights": {"step1": 0.5, "step2": 0.5}}))
    return manifest


def test_a_flat_objective_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          caplog: pytest.LogCaptureFixture) -> None:
    oof = _image_label_case(tmp_path, same_steps=True)  # both steps the same: every weight ranks alike
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()
    assert main(["--oof", str(oof), "--manifest", str(manifest)]) == 0
    assert manifest.read_bytes() == before and not (tmp_path / "manifest.fit.json").exists()
    assert "nothing fitted: the objective is flat" in capsys.readouterr().out
    assert "the objective is flat" in caplog.text


@pytest.mark.parametrize("spoil, needle", [
    ("no step2", "8 of 8 cells have NaN or infinite m0 Step 1 / Step 2 scores"),
    ("one class", "truth for class(es) 0 (Nucleoplasm) only"),
    ("no labels", "the export has no image labels (oof_images.csv"),
    ("twice", "image a is in more than one export folder"),
])
def test_exports_that_cannot_be_fitted_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: str,
                                                   needle: str) -> None:
    oof = _image_label_case(tmp_path)
    folders = [str(oof)]
    if spoil == "no step2":  # an export of a manifest that weighs Step 2 0: no Step 2 scores
        table = read_oof([oof])
        with CellsWriter(oof, models=["m0"], resume=False) as w:
            for iid, rows in table.groupby("ID"):
                s1 = rows[[f"m0_step1_{c:02d}" for c in range(NUM_CLASSES)]].to_numpy()
                lab = np.zeros((SIDE, SIDE), np.int32)
                lab[: SIDE // 2], lab[SIDE // 2 :] = 1, 2
                w.write_image(iid, lab, (SIDE, SIDE), rows["cell_id"].to_numpy(), s1, {"m0": {"step1": s1}})
    elif spoil == "one class":
        write_image_table(oof, pd.DataFrame([[i, 0, "0", *[0.5] * NUM_CLASSES] for i in "abcd"],
                                            columns=["ID", "fold", "Label", *IMAGE_COLS]))
    elif spoil == "no labels":
        (oof / "oof_images.csv").unlink()
    else:
        import shutil

        folders.append(str(shutil.copytree(oof, tmp_path / "copy")))
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()
    assert main(["--oof", *folders, "--manifest", str(manifest)]) == 2
    assert needle in caplog.text and "mAP 0.0000" not in caplog.text
    assert manifest.read_bytes() == before


def test_the_manifest_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies before its write is complete (here: the final rename fails) leaves
    the old manifest whole, never a truncated one."""
    import os

    oof = _image_label_case(tmp_path)
    manifest = _manifest(tmp_path)
    before = manifest.read_bytes()

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    assert main(["--oof", str(oof), "--manifest", str(manifest)]) == 2
    assert manifest.read_bytes() == before
    monkeypatch.undo()
    assert main(["--oof", str(oof), "--manifest", str(manifest)]) == 0
    assert json.loads(manifest.read_text())["step_weights"]["step1"] > 0.5


def test_the_written_manifest_loads_with_the_fitted_weights(tmp_path: Path) -> None:
    from hpa_kernel.config import load_config

    truth, oof = _known_case(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"step_weights": {"step1": 0.5, "step2": 0.5}, "step1": {"cam": "minmax"}}))
    assert main(["--oof", str(oof), "--truth", str(truth), "--manifest", str(manifest), "--per-class"]) == 0
    cfg = load_config(manifest)  # rewritten in place
    assert cfg.cam_norm == "minmax" and len(cfg.step1_weight) == NUM_CLASSES
    assert cfg.step1_weight[0] > 0.5 > cfg.step1_weight[1]
    assert (tmp_path / "manifest.fit.json").is_file()
