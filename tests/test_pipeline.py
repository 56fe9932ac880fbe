"""End-to-end: the orchestrator and the CLI on small synthetic Kaggle-layout folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa_kernel import __version__
from hpa_kernel.config import load_config
from hpa_kernel.run.budget import LEVEL_EMPTY, Budget
from hpa_kernel.run.options import RunOptions, select_ids
from hpa_kernel.run.pipeline import run
from hpa_kernel.formats.submission import validate_submission
from hpa_kernel.submit import main

from conftest import write_manifest


def _opts(data: Path, out: Path, **kw) -> RunOptions:
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return RunOptions(data_dir=data, out=out, **kw)


@pytest.fixture(scope="module")
def full_run(small_dataset, tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "submission.csv"
    summary = run(load_config(tiny_manifest), _opts(small_dataset, out, save_overlays=out.parent / "ov"))
    return summary, out


def test_run_writes_a_valid_complete_submission(full_run, small_dataset):
    summary, out = full_run
    sample = pd.read_csv(small_dataset / "sample_submission.csv")
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub["ID"]) == list(sample["ID"])
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    assert summary.n_failed == 0 and summary.n_done == len(sample)
    # every image has cells, each with at least one class line
    assert all(len(p.split()) >= 3 for p in sub["PredictionString"])
    assert (sub["ImageWidth"].values == sample["ImageWidth"].values).all()
    assert not out.with_name(out.name + ".journal").exists()


def test_summary_reports_stage_times(full_run):
    summary, _ = full_run
    text = summary.format()
    for stage in ("read", "segmentation", "forward_full", "step1", "forward_crops", "rle"):
        assert stage in summary.stage_seconds, stage
    assert __version__ in text and "failed" in text


def test_overlays_written(full_run, small_dataset):
    import cv2

    from hpa_kernel.formats.overlay import LEGEND_WIDTH

    _, out = full_run
    pngs = sorted((out.parent / "ov").glob("*.png"))
    assert len(pngs) == len(pd.read_csv(small_dataset / "sample_submission.csv"))
    img = cv2.imread(str(pngs[0]))
    assert img.shape == (512, 512 + LEGEND_WIDTH, 3) and img.std() > 0  # the image, then the legend


def test_metric_scores_the_output(full_run, small_dataset):
    from hpa_kernel.tools.metric import evaluate

    _, out = full_run
    res = evaluate(out, small_dataset / "truth")
    assert 0.0 <= res.mAP <= 1.0


def test_step1_only_differs_from_full(small_dataset, tiny_manifest, tmp_path, full_run):
    cfg = load_config(tiny_manifest)
    out = tmp_path / "s1.csv"
    run(cfg.replace(step2_weight=0.0), _opts(small_dataset, out))
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    assert out.read_bytes() != full_run[1].read_bytes()


def test_shards_merge_to_the_unsharded_file(small_dataset, tiny_manifest, tmp_path, full_run):
    parts = []
    for i in range(2):
        p = tmp_path / f"part{i}.csv"
        rc = main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(p),
                   "--shard", f"{i}/2", "--device", "cpu", "--no-progress", "-q"])
        assert rc == 0
        parts.append(str(p))
    merged = tmp_path / "merged.csv"
    assert main(["merge", *parts, "--sample", str(small_dataset / "sample_submission.csv"), "--out", str(merged)]) == 0
    assert merged.read_bytes() == full_run[1].read_bytes()


def test_select_ids():
    ids = [str(i) for i in range(10)]
    assert select_ids(ids, (1, 3), None) == ["1", "4", "7"]
    assert select_ids(ids, None, 2) == ["0", "1"]
    with pytest.raises(ValueError):
        select_ids(ids, (3, 3), None)


def test_budget_degrades_in_order():
    b = Budget(seconds=100.0, start=0.0)
    assert b.level(0, remaining=10, now=1.0) == 0  # nothing measured yet
    b.record(0, 10.0)  # 10 s per full image
    assert b.level(0, remaining=5, now=10.0) == 0  # 50 s needed, 85 left
    assert b.level(0, remaining=12, now=10.0) == 1  # 120 > 85; Step 1 only: 72 <= 85
    assert b.level(0, remaining=18, now=10.0) == 2  # 0.45 * 10 * 18 = 81 <= 85
    assert b.level(0, remaining=30, now=10.0) == LEVEL_EMPTY
    assert b.level(0, remaining=3, now=99.0) == LEVEL_EMPTY  # past the margin


def test_bad_classifier_file_still_writes_every_row(small_dataset, tiny_checkpoint, tmp_path):
    """A bad classifier beside a good one: skipped, every row written, exit 1."""
    import json

    manifest = write_manifest(tmp_path / "w", tiny_checkpoint)
    (tmp_path / "w" / "bad.pt").write_bytes(b"not a checkpoint at all")
    raw = json.loads(manifest.read_text())
    raw["classifiers"].append({"path": "bad.pt", "weight": 1.0})
    manifest.write_text(json.dumps(raw))
    out = tmp_path / "sub.csv"
    summary = run(load_config(manifest), _opts(small_dataset, out))
    assert any("bad.pt skipped" in w for w in summary.warnings)
    assert summary.n_failed == 0 and not summary.ok  # every image went through, without that model
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    assert len(pd.read_csv(out)) == len(pd.read_csv(small_dataset / "sample_submission.csv"))
    # the CLI says so in its exit status: the file is complete, not what was asked for
    assert main(["--data-dir", str(small_dataset), "--weights", str(manifest), "--out", str(out),
                 "--device", "cpu", "--no-resume", "-q"]) == 1


def test_no_usable_classifier_stops_before_any_image(small_dataset, tmp_path, capsys):
    """Only a bad classifier: every row would be empty, so nothing is run and no file is written (exit 2)."""
    from hpa_kernel.run.pipeline import NoUsableClassifier

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    manifest = write_manifest(tmp_path / "w", bad)
    out = tmp_path / "sub.csv"
    with pytest.raises(NoUsableClassifier, match="model.pt"):
        run(load_config(manifest), _opts(small_dataset, out))
    assert not out.exists() and not list(tmp_path.glob("sub.csv*"))
    assert main(["--data-dir", str(small_dataset), "--weights", str(manifest), "--out", str(out),
                 "--device", "cpu", "--no-resume", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable classifier, nothing was run: classifier ") and "model.pt" in err[-1]
    assert not out.exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--weights", str(tmp_path / "nope.json"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json" in err[0]


def test_cli_version():
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.submit", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_unusable_segmentation_weights_fall_back_to_classic(small_dataset, tiny_checkpoint, tmp_path):
    """Weight files of the wrong kind for the hpa segmenter: the classic one runs instead,
    the summary says so and the CLI exits 1; every row is still written."""
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "nuc.pth").write_bytes(b"not a state dict")
    (folder / "cell.pth").write_bytes(b"not a state dict")
    manifest = write_manifest(folder, tiny_checkpoint,
                              segmentation={"method": "hpa", "nuclei": "nuc.pth", "cell": "cell.pth"})
    out = tmp_path / "sub.csv"
    summary = run(load_config(manifest), _opts(small_dataset, out))
    assert summary.segmenter == "classic (fallback)"
    assert len(summary.component_failures) == 1 and "segmentation weights unusable" in summary.component_failures[0]
    assert summary.n_failed == 0 and not summary.ok
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    assert all(len(p.split()) >= 3 for p in pd.read_csv(out, keep_default_na=False)["PredictionString"])
    assert main(["--data-dir", str(small_dataset), "--weights", str(manifest), "--out", str(out),
                 "--device", "cpu", "--no-resume", "-q"]) == 1
