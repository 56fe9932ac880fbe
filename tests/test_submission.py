"""Tests for hpa_kernel.formats.submission and the hpa_kernel.tools.validate CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from hpa_kernel.formats.rle import decode_mask, encode_label_image, encode_mask
from hpa_kernel.formats.submission import (
    COLUMNS,
    format_confidence,
    prediction_string,
    validate_submission,
    write_submission,
)
from hpa_kernel.tools.validate import main as validate_main

HEADER = ",".join(COLUMNS) + "\n"


def _labels() -> np.ndarray:
    lab = np.zeros((8, 8), np.int32)
    lab[1:3, 1:4] = 1
    lab[4:7, 2:5] = 2
    lab[0, 7] = 3
    return lab


def _sample(tmp_path, rows=(("a", 16, 12), ("b", 8, 8), ("c", 0, 0))):
    p = tmp_path / "sample_submission.csv"
    p.write_text(HEADER + "".join(f"{i},{w},{h},0 1 eNoLCAgAARQA6A==\n" for i, w, h in rows))
    return p


def _good_rows() -> dict[str, tuple[int, int, str]]:
    lab = _labels()
    scores = np.zeros((3, 19), np.float32)
    scores[0, 0] = 0.9
    scores[1, [2, 18]] = [0.25, 0.125]
    rles = encode_label_image(lab, 16, 12)
    return {
        "a": (16, 12, prediction_string(rles, [1, 2, 3], scores)),
        "b": (8, 8, ""),
        "c": (20, 10, prediction_string(encode_label_image(lab, 20, 10), [3], np.full((1, 19), 0.5))),
    }


# ------------------------------------------------------------------ prediction_string


def test_prediction_string_triples_and_reuse():
    rles = {1: "AAA=", 2: "BBB=", 5: "CCC="}
    scores = np.zeros((3, 19), np.float32)
    scores[0, [3, 0]] = [0.5, 0.123456789]
    scores[1, 18] = 1.0
    scores[2, 7] = 1e-7
    s = prediction_string(rles, np.array([1, 2, 5]), scores)
    assert s == "0 0.123457 AAA= 3 0.5 AAA= 18 1 BBB= 7 1e-07 CCC="
    # min_confidence is strict, and 0 is never written
    assert prediction_string(rles, [1, 2, 5], np.zeros((3, 19))) == ""
    assert prediction_string({}, [], np.zeros((0, 19))) == ""


def test_prediction_string_skips_cells_without_mask_and_nonfinite():
    scores = np.full((2, 19), np.nan, np.float32)
    scores[0, 4] = 0.75
    scores[1, 4] = np.inf
    assert prediction_string({1: "M"}, [1, 9], scores) == "4 0.75 M"


def test_prediction_string_checks_shape():
    with pytest.raises(ValueError, match=r"\(2, 19\)"):
        prediction_string({}, [1, 2], np.zeros((2, 18)))


def test_format_confidence_is_deterministic_and_round_trips_ranking():
    xs = np.array([0.9999996, 0.5, 1 / 3, 2e-5, 0.1000004], np.float32)
    out = [format_confidence(x) for x in xs]
    assert out == ["1", "0.5", "0.333333", "2e-05", "0.1"]
    # 6 significant digits: relative error below 5e-6
    assert all(abs(float(o) - float(x)) <= 5e-6 * abs(float(x)) for o, x in zip(out, xs))


# ------------------------------------------------------------------ write_submission


def test_write_submission_order_atomic_and_valid(tmp_path):
    sample = _sample(tmp_path)
    rows = _good_rows()
    out = tmp_path / "sub" / "submission.csv"
    assert write_submission(rows, ["a", "b", "c"], out) == out
    with open(out, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(COLUMNS)
    assert [r[0] for r in lines[1:]] == ["a", "b", "c"]
    assert lines[1][1:3] == ["16", "12"] and lines[2][3] == ""
    assert validate_submission(out, sample) == []
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temp left

    # every mask of row a decodes to its cell
    tokens = lines[1][3].split()
    masks = {tokens[i + 2] for i in range(0, len(tokens), 3)}
    assert len(masks) == 2 and all(decode_mask(m, 12, 16).any() for m in masks)


def test_write_submission_missing_row_and_fallback(tmp_path):
    rows = _good_rows()
    del rows["b"]
    out = tmp_path / "submission.csv"
    with pytest.raises(KeyError, match="'b'"):
        write_submission(rows, ["a", "b", "c"], out)
    assert not out.exists()
    write_submission(rows, ["a", "b", "c"], out, fallback={"b": (8, 8)})
    write_submission(rows, ["a", "b", "c"], out, fallback=(8, 8))
    assert validate_submission(out, _sample(tmp_path)) == []
    with pytest.raises(KeyError, match="no fallback size"):
        write_submission(rows, ["a", "b", "c"], out, fallback={"x": (1, 1)})


def test_write_submission_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    with pytest.raises(ValueError, match="comma"):
        write_submission({"a": (4, 4, "0 1 x,y")}, ["a"], out)
    with pytest.raises(ValueError, match="positive size"):
        write_submission({"a": (0, 4, "0 1 M")}, ["a"], out)
    with pytest.raises(ValueError, match="integers"):
        write_submission({"a": (4.5, 4, "")}, ["a"], out)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_write_submission_duplicates_and_extras(tmp_path):
    out = tmp_path / "s.csv"
    write_submission({"a": (4, 4, ""), "zzz": (4, 4, "")}, ["a", "a"], out)
    assert out.read_text() == HEADER + "a,4,4,\n"


# ------------------------------------------------------------------ validate_submission


def _write_raw(tmp_path, lines: list[str]):
    p = tmp_path / "bad.csv"
    p.write_text(HEADER + "".join(line + "\n" for line in lines))
    return p


def test_validate_reports_each_fault_on_one_line(tmp_path):
    sample = _sample(tmp_path)
    good = _good_rows()
    a = good["a"][2]
    m = a.split()[2]
    empty = encode_mask(np.zeros((12, 16), bool))
    lines = [
        f"a,16,12,{a} 19 0.5 {m} 3 nan {m} 4 0.2 {empty} 5 0.1 {m}Zm9v",
        "b,8,9,0 0.5",
        "b,8,8,",
        "x,4,4,",
        "c,-3,abc,",
    ]
    problems = validate_submission(_write_raw(tmp_path, lines), sample)
    assert all("\n" not in p for p in problems)
    text = "\n".join(problems)
    expected = [
        "ID b: appears 2 times",
        "ID x: not in the sample",
        "ID b: ImageHeight 9 differs from the sample's 8",
        "ID b: PredictionString has 2 tokens",
        "ID c: ImageWidth '-3' is not a positive integer",
        "ID c: ImageHeight 'abc' is not a positive integer",
        "ID a: class not in 0..18: triple 4 ('19')",
        "ID a: confidence not a finite number: triple 5 ('nan')",
        "ID a: empty mask: triple 6",
        "ID a: bad mask: triple 7 (mask string is not valid base64",
    ]
    for e in expected:
        assert e in text, (e, problems)
    assert len(problems) == len(expected), problems


def test_validate_missing_ids_header_and_unreadable(tmp_path):
    sample = _sample(tmp_path)
    p = _write_raw(tmp_path, ["a,16,12,"])
    assert sorted(validate_submission(p, sample)) == ["ID b: missing", "ID c: missing"]
    p.write_text("ID,Width,Height,PredictionString\n")
    assert "columns" in validate_submission(p, sample)[0]
    p.write_text("")
    assert validate_submission(p, sample) == [f"{p}: empty file"]
    assert "cannot read" in validate_submission(tmp_path / "nope.csv", sample)[0]
    assert "cannot read" in validate_submission(p, tmp_path / "nope.csv")[0]


def test_validate_counts_repeated_faults_once_per_row(tmp_path):
    sample = _sample(tmp_path, rows=(("a", 4, 4),))
    mask = encode_mask(np.ones((4, 4), bool))
    wrong = encode_mask(np.ones((5, 4), bool))
    p = _write_raw(tmp_path, ["a,4,4," + " ".join(f"{k} 0.5 {wrong}" for k in range(10)) + f" 0 0.5 {mask}"])
    problems = validate_submission(p, sample)
    assert problems == [
        "ID a: bad mask: triple 1 (RLE runs cover 20 pixels, expected 4x4=16) (and 9 more)"
    ]


def test_validate_is_fast_on_a_large_submission(tmp_path):
    """100 distinct 1024x1024 images, ~40 cells each, several classes per cell."""
    rng = np.random.default_rng(0)
    rows = {}
    for i in range(100):
        lab = rng.integers(0, 40, (16, 16)).astype(np.int32)
        rles = encode_label_image(lab, 1024, 1024)
        ids = np.array(sorted(rles))
        scores = (rng.random((ids.size, 19)) < 0.15) * rng.random((ids.size, 19))
        rows[f"img{i:04d}"] = (1024, 1024, prediction_string(rles, ids, scores))
    sample = tmp_path / "sample.csv"
    sample.write_text(HEADER + "".join(f"{k},1024,1024,\n" for k in rows))
    out = write_submission(rows, list(rows), tmp_path / "submission.csv")
    t0 = time.perf_counter()
    assert validate_submission(out, sample) == []
    assert time.perf_counter() - t0 < 20
    # and a single corrupted mask among them is found
    text = out.read_text()
    first_mask = rows["img0050"][2].split()[2]
    out.write_text(text.replace(first_mask, first_mask[:-8] + "AAAAAAA=", 1))
    problems = validate_submission(out, sample)
    assert len(problems) >= 1 and all("bad mask" in p for p in problems), problems


# ------------------------------------------------------------------ CLI


def test_validate_cli(tmp_path, capsys):
    sample = _sample(tmp_path)
    out = write_submission(_good_rows(), ["a", "b", "c"], tmp_path / "submission.csv")
    assert validate_main([str(out), "--sample", str(sample)]) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 rows"

    bad = _write_raw(tmp_path, ["a,16,12,", "b,8,8,0 0.5"])
    assert validate_main([str(bad), "--sample", str(sample)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert "ID c: missing" in printed
    assert printed[-1].startswith("INVALID: 2 problem(s)")
    assert validate_main([str(bad), "--sample", str(sample), "--max-problems", "1"]) == 1
    assert "... 1 more" in capsys.readouterr().out


def test_validate_module_entry_point(tmp_path):
    sample = _sample(tmp_path)
    out = write_submission(_good_rows(), ["a", "b", "c"], tmp_path / "submission.csv")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, "-m", "hpa_kernel.tools.validate", str(out), "--sample", str(sample)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK: 3 rows"
