"""``submit --save-cells DIR``: the per-cell export written by the run (hpa_kernel.run.pipeline,
hpa_kernel.formats.cells), its agreement with the submission, resuming, faults, shards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.config import load_config
from hpa_kernel.formats.cells import read_cells, read_labels, scores
from hpa_kernel.team_merge import main as merge_main
from hpa_kernel.run.options import RunOptions
from hpa_kernel.run.pipeline import cells_folder, run
from hpa_kernel.stages.ensemble import select_top_classes


def _opts(data: Path, out: Path, **kw) -> RunOptions:
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return RunOptions(data_dir=data, out=out, **kw)


@pytest.fixture(scope="module")
def cells_run(small_dataset, tiny_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("cells_run")
    summary = run(load_config(tiny_manifest), _opts(small_dataset, root / "submission.csv", save_cells=root / "cells"))
    return summary, root / "submission.csv", root / "cells"


def test_export_lists_every_image_with_per_model_steps(cells_run, small_dataset):
    summary, _, folder = cells_run
    assert summary.n_failed == 0 and not summary.warnings
    sample = pd.read_csv(small_dataset / "sample_submission.csv")
    t = read_cells(folder)
    assert t.models == ["m0"]
    assert list(t.images["ID"]) == list(sample["ID"])
    assert (t.images[["ImageWidth", "ImageHeight"]].to_numpy() == sample[["ImageWidth", "ImageHeight"]].to_numpy()).all()
    cfg_w1 = cfg_w2 = 0.5  # conftest's manifest: the default step weights
    for image_id, rows in t.cells.groupby("ID", sort=False):
        labels = read_labels(folder, image_id)
        assert labels.shape == (512, 512)
        assert list(rows["cell_id"]) == sorted(set(np.unique(labels)) - {0})
        s1, s2, ens = (scores(rows, "m0", s) for s in ("step1", "step2", "ens"))
        assert np.isfinite(s1).all() and np.isfinite(s2).all()
        np.testing.assert_allclose(ens, cfg_w1 * s1 + cfg_w2 * s2, rtol=1e-6, atol=1e-7)
        # one model: the final scores are the class-selection rule applied to its ensemble
        np.testing.assert_array_equal(scores(rows), select_top_classes(ens, top_n=18, floor=0.0))
        assert (rows["area"] > 0).all() and (rows["y1"] > rows["y0"]).all() and (rows["x1"] > rows["x0"]).all()


def test_merging_the_export_gives_the_submission_byte_for_byte(cells_run, small_dataset, tmp_path):
    _, sub, folder = cells_run
    out = tmp_path / "x.csv"
    assert merge_main([str(folder), "--sample", str(small_dataset / "sample_submission.csv"), "--out", str(out), "-q"]) == 0
    assert out.read_bytes() == sub.read_bytes()


def _same_table(a: Path, b: Path) -> None:
    ta, tb = read_cells(a), read_cells(b)
    pd.testing.assert_frame_equal(ta.images, tb.images)
    pd.testing.assert_frame_equal(ta.cells, tb.cells)
    for image_id in ta.images["ID"]:
        assert np.array_equal(read_labels(a, image_id), read_labels(b, image_id))


def test_interrupted_export_resumes_to_the_same_table(cells_run, small_dataset, tiny_manifest, tmp_path):
    """What a kill leaves (two images done, the third's table part written but its
    images.csv line cut short) resumes to the uninterrupted table."""
    _, sub, ref = cells_run
    folder = tmp_path / "cells"
    cfg = load_config(tiny_manifest)
    run(cfg, _opts(small_dataset, tmp_path / "first.csv", save_cells=folder, max_images=2))
    third = read_cells(ref).images["ID"].iloc[2]
    shutil.copy(ref / "cells.parquet" / f"{third}.parquet", folder / "cells.parquet" / f"{third}.parquet")
    with open(folder / "images.csv", "a") as f:
        f.write(f"{third},51")  # cut by the kill
    summary = run(cfg, _opts(small_dataset, tmp_path / "sub.csv", save_cells=folder))
    assert summary.n_failed == 0 and not summary.warnings
    _same_table(folder, ref)
    assert (tmp_path / "sub.csv").read_bytes() == sub.read_bytes()


def test_csv_export_resumes_too(small_dataset, tiny_manifest, tmp_path):
    """Resuming keeps the format on disk: a CSV table (what a run without pyarrow writes)."""
    from hpa_kernel.formats.cells import CellsWriter

    cfg = load_config(tiny_manifest)
    ref, folder = tmp_path / "ref", tmp_path / "cells"
    for f in (ref, folder):
        CellsWriter(f, models=["m0"], fmt="csv").close()
    run(cfg, _opts(small_dataset, tmp_path / "ref.csv", save_cells=ref))
    run(cfg, _opts(small_dataset, tmp_path / "a.csv", save_cells=folder, max_images=1))
    with open(folder / "cells.csv", "a") as f:
        f.write("half,a,row")  # rows of an image whose images.csv line never came
    run(cfg, _opts(small_dataset, tmp_path / "b.csv", save_cells=folder))
    assert read_cells(folder).format == "csv"
    _same_table(folder, ref)


def test_export_failure_costs_no_row(cells_run, small_dataset, tiny_manifest, tmp_path):
    _, sub, _ = cells_run
    folder = tmp_path / "cells"
    first = pd.read_csv(small_dataset / "sample_submission.csv")["ID"].iloc[0]
    (folder / "labels" / f"{first}.png").mkdir(parents=True)  # its label PNG cannot be written
    out = tmp_path / "sub.csv"
    summary = run(load_config(tiny_manifest), _opts(small_dataset, out, save_cells=folder))
    assert out.read_bytes() == sub.read_bytes()  # every row, as without the export
    assert summary.n_failed == 0
    assert any("per-cell export failed for 1 image(s)" in w and first in w for w in summary.warnings)
    t = read_cells(folder)
    assert first not in set(t.images["ID"]) and len(t.images) == 3


def test_unusable_folder_disables_the_export_not_the_run(cells_run, small_dataset, tiny_manifest, tmp_path):
    _, sub, _ = cells_run
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = tmp_path / "sub.csv"
    summary = run(load_config(tiny_manifest), _opts(small_dataset, out, save_cells=blocker))
    assert out.read_bytes() == sub.read_bytes()
    assert any("per-cell export" in w and "disabled" in w for w in summary.warnings)


def test_a_shard_writes_its_own_folder(cells_run, small_dataset, tiny_manifest, tmp_path):
    _, _, ref = cells_run
    assert cells_folder(tmp_path, (1, 2)) == tmp_path / "shard-1-of-2" and cells_folder(tmp_path, None) == tmp_path
    run(load_config(tiny_manifest), _opts(small_dataset, tmp_path / "p.csv", save_cells=tmp_path / "c", shard=(1, 2)))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["shard-1-of-2"]
    t, whole = read_cells(tmp_path / "c" / "shard-1-of-2"), read_cells(ref)
    assert list(t.images["ID"]) == list(whole.images["ID"])[1::2]
    pd.testing.assert_frame_equal(t.cells, whole.cells[whole.cells["ID"].isin(set(t.images["ID"]))].reset_index(drop=True))


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_table(tiny_manifest, tmp_path):
    """SIGKILL mid-way through a --save-cells run; the rerun gives the uninterrupted table and file."""
    from hpa_kernel.tools.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, images=6, seed=9300, sizes=(512,), depth=8, split="test")
    cmd = [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(tiny_manifest),
           "--device", "cpu", "--no-progress", "-q"]
    assert subprocess.run(cmd + ["--out", str(tmp_path / "ref.csv"), "--save-cells", str(tmp_path / "ref")]).returncode == 0
    out, folder = tmp_path / "sub.csv", tmp_path / "cells"
    proc = subprocess.Popen(cmd + ["--out", str(out), "--save-cells", str(folder)])
    deadline = time.time() + 300
    while _lines(folder / "images.csv") < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 2 <= _lines(folder / "images.csv") - 1 < 6
    r = subprocess.run(cmd + ["--out", str(out), "--save-cells", str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()
    _same_table(folder, tmp_path / "ref")
