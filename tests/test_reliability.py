"""Fault injection: every fault of RELIABILITY.md planted in one Kaggle-layout folder.

For each fault the run completes, every ID has a row, the bad images are listed in the
summary with the reason, the output validates, and nothing but the bad image's own cells
is lost (good images score the same as in a clean run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from hpa_kernel.config import ConfigError, load_config
from hpa_kernel.run.options import RunOptions
from hpa_kernel.run.pipeline import run
from hpa_kernel.formats.submission import validate_submission

CH = ("red", "green", "blue", "yellow")


def _png(folder: Path, image_id: str, ch: str) -> Path:
    return folder / "test" / f"{image_id}_{ch}.png"


def _write_rgby(folder: Path, image_id: str, rgby: np.ndarray) -> None:
    for i, ch in enumerate(CH):
        assert cv2.imwrite(str(_png(folder, image_id, ch)), rgby[..., i])


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """(folder, {id: fault}) with every fault planted next to clean images."""
    from hpa_kernel.tools.synthetic import make_image, write_dataset

    root = tmp_path_factory.mktemp("faulty")
    write_dataset(root, images=8, seed=9200, sizes=(512,), depth="mixed", split="test")
    sample = pd.read_csv(root / "sample_submission.csv")
    ids = list(sample["ID"])
    faults: dict[str, str] = {}
    rng = np.random.default_rng(9201)

    # 1 truncated PNG, 2 zero-byte file, 3 missing channel, 4 channels of different sizes
    p = _png(root, ids[0], "green"); p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]); faults[ids[0]] = "truncated"
    _png(root, ids[1], "blue").write_bytes(b""); faults[ids[1]] = "zero-byte"
    _png(root, ids[2], "yellow").unlink(); faults[ids[2]] = "missing channel"
    img = cv2.imread(str(_png(root, ids[3], "red")), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(_png(root, ids[3], "red")), cv2.resize(img, (300, 300))); faults[ids[3]] = "size mismatch"
    # 5 an RGB (3-plane) PNG where one plane is expected: accepted (converted), not lost
    red = cv2.imread(str(_png(root, ids[4], "red")), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(_png(root, ids[4], "red")), np.dstack([red, red, red])); faults[ids[4]] = "ok:rgb-plane"
    # 6 all-black image: zero cells, an empty row, no failure
    _write_rgby(root, ids[5], np.zeros((512, 512, 4), np.uint8)); faults[ids[5]] = "ok:black"
    # (ids[6], ids[7] stay clean: one 8-bit and one 16-bit side by side, depth="mixed")

    extra = []
    # 7 a 4096² image, 8 1728² and non-square images
    base = make_image(rng, 1024, 1024, depth=16)
    _write_rgby(root, "big4096", cv2.resize(base.rgby, (4096, 4096), interpolation=cv2.INTER_NEAREST))
    extra.append(("big4096", 4096, 4096)); faults["big4096"] = "ok:4096"
    for name, (h, w) in {"side1728": (1728, 1728), "nonsquare": (1000, 1006)}.items():
        s = make_image(rng, h, w, depth=8)
        _write_rgby(root, name, s.rgby)
        extra.append((name, w, h)); faults[name] = "ok:" + name
    # 9 more than 255 cells
    crowd = make_image(rng, 2048, 2048, depth=8, n_cells=300)
    _write_rgby(root, "crowded", crowd.rgby)
    extra.append(("crowded", 2048, 2048)); faults["crowded"] = "ok:crowded"
    # 10 an ID with no files at all
    extra.append(("nofiles", 2048, 2048)); faults["nofiles"] = "no files"
    rows = pd.concat([sample, pd.DataFrame(extra, columns=["ID", "ImageWidth", "ImageHeight"])], ignore_index=True)
    rows["PredictionString"] = ""
    # 11 a duplicate ID in sample_submission.csv
    rows = pd.concat([rows, rows.iloc[[6]]], ignore_index=True)
    rows.to_csv(root / "sample_submission.csv", index=False)
    return root, faults


@pytest.fixture(scope="module")
def faulty_run(faulty, tiny_manifest, tmp_path_factory):
    root, faults = faulty
    out = tmp_path_factory.mktemp("out") / "submission.csv"
    summary = run(load_config(tiny_manifest), RunOptions(data_dir=root, out=out, device="cpu", progress=False))
    return summary, out


def test_every_id_gets_exactly_one_row(faulty, faulty_run):
    root, _ = faulty
    _, out = faulty_run
    sample_ids = list(dict.fromkeys(pd.read_csv(root / "sample_submission.csv")["ID"]))
    sub = pd.read_csv(out, keep_default_na=False)
    assert list(sub["ID"]) == sample_ids


def test_bad_images_are_listed_with_their_reason(faulty, faulty_run):
    _, faults = faulty
    summary, _ = faulty_run
    bad = {i for i, f in faults.items() if not f.startswith("ok:")}
    assert set(summary.failures) == bad
    text = summary.format()
    for i in bad:
        assert i in text
    assert "yellow" in summary.failures[[i for i in bad if faults[i] == "missing channel"][0]]
    assert any("duplicate" in w for w in summary.warnings)


def test_output_validates(faulty, faulty_run):
    root, _ = faulty
    _, out = faulty_run
    problems = validate_submission(out, root / "sample_submission.csv")
    assert [p for p in problems if "duplicate" not in p.lower()] == []


def test_odd_but_valid_images_are_predicted(faulty, faulty_run):
    from hpa_kernel.formats.rle import decode_mask

    _, faults = faulty
    _, out = faulty_run
    sub = pd.read_csv(out, keep_default_na=False).set_index("ID")
    for i, f in faults.items():
        if f.startswith("ok:") and f != "ok:black":
            assert sub.loc[i, "PredictionString"], f
    assert sub.loc[[i for i, f in faults.items() if f == "ok:black"][0], "PredictionString"] == ""
    big = sub.loc["big4096"]
    toks = big["PredictionString"].split()
    m = decode_mask(toks[2], int(big["ImageHeight"]), int(big["ImageWidth"]))
    assert m.shape == (4096, 4096) and m.any()
    nonsq = sub.loc["nonsquare"]
    assert (int(nonsq["ImageWidth"]), int(nonsq["ImageHeight"])) == (1006, 1000)
    masks = set(sub.loc["crowded", "PredictionString"].split()[2::3])
    assert len(masks) > 255  # no uint8 wrap anywhere from segmentation to RLE


def test_nothing_but_the_bad_images_is_lost(faulty, faulty_run, tiny_manifest, tmp_path):
    """The clean images' rows are byte-identical to a run on the clean images alone."""
    root, faults = faulty
    _, out = faulty_run
    clean = tmp_path / "clean"
    (clean / "test").mkdir(parents=True)
    sample = pd.read_csv(root / "sample_submission.csv").drop_duplicates("ID")
    keep = [i for i in sample["ID"] if i not in faults or faults[i] == "ok:4096"]
    for i in keep:
        for ch in CH:
            shutil.copy(_png(root, i, ch), _png(clean, i, ch))
    sample[sample["ID"].isin(keep)].to_csv(clean / "sample_submission.csv", index=False)
    out2 = tmp_path / "clean.csv"
    run(load_config(tiny_manifest), RunOptions(data_dir=clean, out=out2, device="cpu", progress=False))
    a = pd.read_csv(out, keep_default_na=False).set_index("ID").loc[keep]
    b = pd.read_csv(out2, keep_default_na=False).set_index("ID").loc[keep]
    pd.testing.assert_frame_equal(a, b)


def _journal_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tiny_manifest, tmp_path):
    """SIGKILL mid-way; the restart redoes only what is missing; same bytes as uninterrupted."""
    from hpa_kernel.tools.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, images=6, seed=9300, sizes=(512,), depth=8, split="test")
    cmd = [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(tiny_manifest),
           "--device", "cpu", "--no-progress", "-q"]
    ref = tmp_path / "ref.csv"
    assert subprocess.run(cmd + ["--out", str(ref)]).returncode == 0

    out = tmp_path / "sub.csv"
    journal = out.with_name(out.name + ".journal")
    proc = subprocess.Popen(cmd + ["--out", str(out)])
    deadline = time.time() + 300
    while _journal_lines(journal) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _journal_lines(journal) - 1
    assert not out.exists() and 2 <= done_before < 6
    r = subprocess.run(cmd + ["--out", str(out), "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{done_before} resumed" in r.stdout
    assert out.read_bytes() == ref.read_bytes()
    assert not journal.exists()


def test_time_budget_exhausted_writes_every_row_without_decoding(small_dataset, tiny_manifest, tmp_path):
    """A budget spent before the first image: empty rows for all, no image decoded, valid file."""
    from hpa_kernel.run.budget import LEVEL_EMPTY

    out = tmp_path / "sub.csv"
    summary = run(load_config(tiny_manifest),
                  RunOptions(data_dir=small_dataset, out=out, device="cpu", progress=False, time_budget=1e-3))
    assert summary.degraded_at.get(LEVEL_EMPTY) == 0
    assert "time budget" in summary.format()
    assert "read" not in summary.stage_seconds  # nothing decoded once out of time
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    sub = pd.read_csv(out, keep_default_na=False)
    assert len(sub) == len(pd.read_csv(small_dataset / "sample_submission.csv"))
    assert (sub["PredictionString"] == "").all() and (sub["ImageWidth"] > 0).all()


def test_each_image_runs_at_the_level_the_budget_took(small_dataset, tiny_manifest):
    """What a budget level means for one image, through the pipeline's per-image step: Step 1
    only cuts no crops and still writes the image's cells; the full level runs Step 2. (When
    the budget takes a level: tests/test_pipeline.py::test_budget_degrades_in_order.)"""
    from hpa_kernel.formats.images import load_image
    from hpa_kernel.run.budget import LEVEL_FULL, LEVEL_STEP1_ONLY
    from hpa_kernel.run.pipeline import predict_row
    from hpa_kernel.run.summary import StageTimer
    from hpa_kernel.stages.predictor import Predictor

    config = load_config(tiny_manifest)
    predictor = Predictor.from_config(config, "cpu", False)
    image_id = pd.read_csv(small_dataset / "sample_submission.csv")["ID"][0]
    item = load_image(small_dataset / "test", image_id, size=config.image_size)
    rows, stages = {}, {}
    for level in (LEVEL_FULL, LEVEL_STEP1_ONLY):
        timer = StageTimer()
        rows[level] = predict_row(predictor, item, level, timer, None)
        stages[level] = set(timer.totals)
    assert "crops" in stages[LEVEL_FULL] and "crops" not in stages[LEVEL_STEP1_ONLY]
    assert "step1" in stages[LEVEL_STEP1_ONLY]
    assert rows[LEVEL_STEP1_ONLY] and rows[LEVEL_STEP1_ONLY] != rows[LEVEL_FULL]


def test_manifest_paths_cannot_escape(tmp_path, tiny_checkpoint):
    import json

    (tmp_path / "w").mkdir()
    for bad in ("../model.pt", str(tiny_checkpoint)):
        (tmp_path / "w" / "manifest.json").write_text(json.dumps({"classifiers": [{"path": bad}]}))
        with pytest.raises(ConfigError):
            load_config(tmp_path / "w" / "manifest.json")
    cfg = load_config(tmp_path / "w" / "manifest.json", allow_outside=True)
    assert cfg.classifiers[0].path == tiny_checkpoint


def test_classifier_refusals_are_clean(tmp_path):
    """A pickle that would run code is refused by the checkpoint loader without running it."""
    import torch

    from hpa_kernel.stages.model import CheckpointError, load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state_dict": Evil(), "meta": {}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
