"""The per-cell export: round trip, incremental append, resume, both table formats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.formats.cells import (
    BASE_COLUMNS,
    STEPS,
    CellsWriter,
    pyarrow_available,
    read_cells,
    read_labels,
    score_columns,
    scores,
)
from hpa_kernel.classes import NUM_CLASSES

FORMATS = ["csv", pytest.param("parquet", marks=pytest.mark.skipif(not pyarrow_available(), reason="pyarrow not installed"))]


def image_rows(table, image_id):
    """The rows of one image in a read-back export."""
    return table.cells[table.cells["ID"] == image_id]


def _image(k: int, n: int = 3, size: int = 32):
    """A label image at the working size with cells 1..n (cell n absent when k is odd) and scores."""
    rng = np.random.default_rng(k)
    lab = np.zeros((size, size), np.int32)
    for c in range(1, n + 1):
        y, x = rng.integers(0, size - 8, 2)
        lab[y : y + 6 + c, x : x + 5 + c] = c
    ids = np.unique(lab[lab > 0])
    final = rng.random((ids.size, NUM_CLASSES)).astype(np.float32)
    per_model = {"m0": {"step1": rng.random((ids.size, NUM_CLASSES)).astype(np.float32), "ens": final},
                 "m1": {s: rng.random((ids.size, NUM_CLASSES)).astype(np.float32) for s in STEPS}}
    return lab, ids, final, per_model


def _oracle_geometry(lab: np.ndarray, ids: np.ndarray, width: int, height: int):
    """Boxes and areas of each cell at the original size: nearest-neighbour upscaling by index."""
    ys = (np.arange(height) * lab.shape[0] / height).astype(int)
    xs = (np.arange(width) * lab.shape[1] / width).astype(int)
    big = lab[np.ix_(ys, xs)]
    out = []
    for c in ids:
        yy, xx = np.nonzero(big == c)
        out.append((yy.min(), xx.min(), yy.max() + 1, xx.max() + 1, yy.size))
    return np.array(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    lab, ids, final, per_model = _image(0)
    width, height = 96, 64  # non-square original, 3x / 2x the 32 px working size
    with CellsWriter(tmp_path, models=["m0", "m1"], fmt=fmt) as w:
        assert w.format == fmt
        assert w.write_image("a", lab, (width, height), ids, final, per_model)
        assert w.write_image("empty", np.zeros((32, 32), np.int32), (50, 40), [], np.zeros((0, NUM_CLASSES)))
    t = read_cells(tmp_path)
    assert t.format == fmt and t.models == ["m0", "m1"]
    assert t.images.to_dict("list") == {"ID": ["a", "empty"], "ImageWidth": [96, 50], "ImageHeight": [64, 40],
                                        "n_cells": [ids.size, 0]}
    cells = t.cells
    assert list(cells.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    assert cells["ID"].tolist() == ["a"] * ids.size and cells["cell_id"].tolist() == ids.tolist()
    np.testing.assert_array_equal(cells[["y0", "x0", "y1", "x1", "area"]].to_numpy(), _oracle_geometry(lab, ids, width, height))
    np.testing.assert_array_equal(scores(cells), final)  # float32 exact in both formats
    np.testing.assert_array_equal(scores(cells, "m0", "step1"), per_model["m0"]["step1"])
    np.testing.assert_array_equal(scores(cells, "m1", "step2"), per_model["m1"]["step2"])
    assert np.isnan(scores(cells, "m0", "step2")).all()  # a step that did not run
    np.testing.assert_array_equal(read_labels(tmp_path, "a"), lab)
    assert read_labels(tmp_path, "a").dtype == np.uint16
    assert score_columns("m1", "ens")[0] == "m1_ens_00" and score_columns()[-1] == "score_18"


@pytest.mark.parametrize("fmt", FORMATS)
def test_append_and_resume(tmp_path, fmt):
    with CellsWriter(tmp_path, models=["m0"], fmt=fmt) as w:
        for k in range(2):
            lab, ids, final, _ = _image(k)
            w.write_image(f"i{k}", lab, (64, 64), ids, final)
        assert len(read_cells(tmp_path).images) == 2  # readable while the run goes on
    with CellsWriter(tmp_path, models=["m0"]) as w:  # "auto" keeps the format on disk
        assert w.format == fmt
        assert "i0" in w and "i1" in w
        lab, ids, final, _ = _image(0)
        assert not w.write_image("i0", lab, (64, 64), ids, final * 0)  # present: skipped
        lab, ids, final, _ = _image(2)
        assert w.write_image("i2", lab, (64, 64), ids, final)
    t = read_cells(tmp_path)
    assert t.images["ID"].tolist() == ["i0", "i1", "i2"]
    np.testing.assert_array_equal(scores(image_rows(t, "i0")), _image(0)[2])  # not overwritten
    np.testing.assert_array_equal(scores(image_rows(t, "i2")), final)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_half_written_last_record_is_dropped(tmp_path, fmt):
    with CellsWriter(tmp_path, models=["m0"], fmt=fmt) as w:
        lab, ids, final, _ = _image(0)
        w.write_image("i0", lab, (64, 64), ids, final)
    # a kill in the middle of the next image: rows (CSV) / a part file (Parquet) and half its index line
    if fmt == "csv":
        with open(tmp_path / "cells.csv", "a") as f:
            f.write("i1,1,0,0,4,4,16,0.5,0.2")
    else:
        lab, ids, final, _ = _image(1)
        pd.read_parquet(tmp_path / "cells.parquet" / "i0.parquet").assign(ID="i1").to_parquet(
            tmp_path / "cells.parquet" / "i1.parquet", index=False)
    with open(tmp_path / "images.csv", "a") as f:
        f.write("i1,64,6")
    t = read_cells(tmp_path)
    assert t.images["ID"].tolist() == ["i0"] and set(t.cells["ID"]) == {"i0"}
    with CellsWriter(tmp_path, models=["m0"]) as w:
        assert w.done == {"i0"}
        lab, ids, final, _ = _image(1)
        w.write_image("i1", lab, (64, 64), ids, final)
    t = read_cells(tmp_path)
    assert t.images["ID"].tolist() == ["i0", "i1"]
    np.testing.assert_array_equal(scores(image_rows(t, "i1")), final)
    assert t.cells["ID"].value_counts().to_dict() == {"i0": _image(0)[1].size, "i1": ids.size}


def test_resume_false_starts_afresh_and_models_must_agree(tmp_path):
    lab, ids, final, _ = _image(0)
    with CellsWriter(tmp_path, models=["m0"], fmt="csv") as w:
        w.write_image("i0", lab, (64, 64), ids, final)
    with pytest.raises(ValueError, match="models"):
        CellsWriter(tmp_path, models=["m0", "m1"])
    with CellsWriter(tmp_path, models=["m0", "m1"], resume=False) as w:
        assert not w.done
        w.write_image("i1", lab, (64, 64), ids, final)
    t = read_cells(tmp_path)
    assert t.images["ID"].tolist() == ["i1"] and t.models == ["m0", "m1"]


def test_auto_format_follows_pyarrow(tmp_path):
    with CellsWriter(tmp_path, fmt="auto") as w:
        assert w.format == ("parquet" if pyarrow_available() else "csv")


def test_without_pyarrow_auto_writes_csv_and_parquet_is_a_clear_error(tmp_path):
    """The export on a machine without pyarrow: run where ``import pyarrow`` fails."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pyarrow'] = None\n"  # import pyarrow -> ImportError
        "from hpa_kernel.formats.cells import CellsWriter, pyarrow_available\n"
        "assert not pyarrow_available()\n"
        f"w = CellsWriter({str(tmp_path / 'auto')!r}, fmt='auto'); print(w.format); w.close()\n"
        "try:\n"
        f"    CellsWriter({str(tmp_path / 'pq')!r}, fmt='parquet')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()[:2]
    assert first == "csv"
    assert second.startswith("refused:") and "pyarrow" in second


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_id="../x"), "cannot name a file"),
        (dict(final=np.zeros((1, NUM_CLASSES))), "final scores must have shape"),
        (dict(per_model={"m9": {}}), "unknown model"),
        (dict(per_model={"m0": {"step3": None}}), "unknown step"),
        (dict(orig_size=(0, 10)), "orig_size"),
    ],
)
def test_bad_writes_name_the_fault(tmp_path, kwargs, message):
    lab, ids, final, _ = _image(0)
    args = dict(image_id="a", labels=lab, orig_size=(64, 64), cell_ids=ids, final=final)
    args.update(kwargs)
    with CellsWriter(tmp_path, models=["m0"], fmt="csv") as w:
        with pytest.raises(ValueError, match=message):
            w.write_image(**args)
        assert not w.done


def test_not_an_export_folder(tmp_path):
    with pytest.raises(ValueError, match="not a per-cell export"):
        read_cells(tmp_path)
