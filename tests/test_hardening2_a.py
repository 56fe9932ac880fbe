"""Hardening, round 2, part A (RELIABILITY.md, "Round 2 (part A)"): each test names its defect.

The tests drive the command lines (``submit``, ``submit merge``, ``merge``) or a public
function as a user would meet them, and state what must hold: every sample ID keeps its
row, a bad value is refused at start-up with one line naming it (exit 2), and a bad input
costs its own cells at most.
"""

from __future__ import annotations

import base64
import csv
import io
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from hpa_kernel.formats.rle import encode_mask
from hpa_kernel.formats.submission import COLUMNS, read_submission, validate_submission, write_submission
from hpa_kernel.team_merge import main as merge_main
from hpa_kernel.submit import main as submit_main

SIZE = 64
IDS = ("img0", "img1", "img2")


# ----------------------------------------------------------------------------- helpers


def _csv(path: Path, rows, header=COLUMNS, bom: bool = False) -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode())
    return path


def _pred(k: int) -> str:
    """Two square cells on image ``k``, each with one class."""
    out = []
    for c, (y, x) in enumerate(((4 + k, 4), (30, 30 - k))):
        m = np.zeros((SIZE, SIZE), bool)
        m[y:y + 20, x:x + 20] = True
        out.append(f"{c} {0.5 + 0.1 * c:.6g} {encode_mask(m)}")
    return " ".join(out)


def _submission(path: Path, bom: bool = False, extra_rows=()) -> Path:
    return _csv(path, [(i, SIZE, SIZE, _pred(k)) for k, i in enumerate(IDS)] + list(extra_rows), bom=bom)


def _sample(path: Path, prediction: str = "") -> Path:
    return _csv(path, [(i, SIZE, SIZE, prediction) for i in IDS])


def _cli(fn, capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = fn([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def _merge(capsys, *argv):
    return _cli(merge_main, capsys, *argv, "--no-progress")


def _submit_merge(capsys, *argv):
    return _cli(submit_main, capsys, "merge", *argv)


# ------------------------------------------- 3. the validator's bound is the sample's size


def _bomb(inflated: int) -> str:
    return base64.b64encode(zlib.compress(b"1" * inflated, 9)).decode()


def _validate_with_peak(sub, sample):
    """``validate_submission``'s problems and its peak of traced (numpy/Python) memory."""
    tracemalloc.start()
    try:
        return validate_submission(sub, sample), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_validator_bounds_inflation_by_the_samples_size_not_the_rows(tmp_path):
    """Item 3: a row claiming 100000x100000 (the sample says 64) must not inflate its mask
    to what a 100000x100000 image could hold; it is checked at the sample's size or not at all."""
    sample = _sample(tmp_path / "sample.csv")
    sub = _csv(tmp_path / "sub.csv", [("img0", 100000, 100000, f"0 0.5 {_bomb(64_000_000)}"),
                                      ("img1", SIZE, SIZE, _pred(1)), ("img2", SIZE, SIZE, _pred(2))])
    problems, peak = _validate_with_peak(sub, sample)
    assert peak < 20_000_000, f"validator peaked at {peak / 1e6:.0f} MB"
    assert any("ImageWidth 100000 differs from the sample's 64" in p for p in problems)
    assert all(p.startswith("ID img0") for p in problems), problems  # the good rows stay good


def test_a_sample_claiming_absurd_sizes_is_refused(tmp_path, capsys):
    """Item 3: a sample saying 100000x100000 cannot license a 1 GiB inflation: the validator
    and the merge refuse it, naming the ID and the cap."""
    sample = _csv(tmp_path / "sample.csv", [("img0", 100000, 100000, "")])
    sub = _csv(tmp_path / "sub.csv", [("img0", 100000, 100000, f"0 0.5 {_bomb(64_000_000)}")])
    problems, peak = _validate_with_peak(sub, sample)
    assert peak < 20_000_000, f"validator peaked at {peak / 1e6:.0f} MB"
    assert len(problems) == 1 and "refused" in problems[0] and "'img0'" in problems[0] and "pixel cap" in problems[0]
    rc, _, err = _merge(capsys, sub, "--sample", sample, "--out", tmp_path / "m.csv")
    assert rc == 2 and "pixel cap" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.csv").exists()
    # a sample without a size: the merge never allocates the reference row's claim past the cap
    no_size = _csv(tmp_path / "no_size.csv", [("img0", "", "", "")])
    rc, stdout, err = _merge(capsys, sub, "--sample", no_size, "--out", tmp_path / "m.csv")
    assert rc == 0, err
    assert "input 0: size over the 50000000-pixel cap on 1 image(s)" in stdout
    assert read_submission(tmp_path / "m.csv") == {"img0": (100000, 100000, "")}


def test_submit_refuses_an_out_naming_its_sample(tmp_path, capsys):
    """Item 13: ``submit --out DATA/sample_submission.csv`` overwrote the sample it reads."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    sample = _sample(data / "sample_submission.csv")
    before = sample.read_bytes()
    rc, _, err = _cli(submit_main, capsys, "--data-dir", data, "--out", sample, "--no-progress")
    assert rc == 2 and err.strip().startswith("error: --out:") and len(err.strip().splitlines()) == 1, err
    assert sample.read_bytes() == before


# ------------------------------------------- 9. one CSV rule: no field cap for any reader


def test_a_sample_with_a_field_over_131072_bytes_is_read_by_submit_merge_and_submit_merge(
        tmp_path, capsys):
    """Item 9: a previous submission used as the sample (a PredictionString over the csv
    module's 131,072-byte default cap) crashed every command with a ``_csv.Error``."""
    long_field = " ".join([_pred(0)] * 2000)
    assert len(long_field) > 131_072
    sample = _sample(tmp_path / "sample_submission.csv", prediction=long_field)
    sub = _submission(tmp_path / "ours.csv")

    rc, out, err = _merge(capsys, sub, "--sample", sample, "--out", tmp_path / "merged.csv")
    assert rc == 0, err
    assert list(read_submission(tmp_path / "merged.csv")) == list(IDS)

    rc, out, err = _submit_merge(capsys, sub, "--sample", sample, "--out", tmp_path / "joined.csv")
    assert rc == 0, err
    assert (tmp_path / "joined.csv").read_bytes() == _submission(tmp_path / "again.csv").read_bytes()

    data = tmp_path / "data"  # submit: the IDs' channel files are missing, so each fails fast
    (data / "test").mkdir(parents=True)
    (data / "sample_submission.csv").write_bytes(sample.read_bytes())
    rc, out, err = _cli(submit_main, capsys, "--data-dir", data, "--out", tmp_path / "s.csv", "--no-progress", "-q")
    assert rc == 1 and "_csv.Error" not in err and "field larger than field limit" not in err
    assert read_submission(tmp_path / "s.csv") == {i: (SIZE, SIZE, "") for i in IDS}


# ------------------------------------------- 13. --out checked at start-up, never the sample


@pytest.mark.parametrize("command", ["merge", "submit merge"])
@pytest.mark.parametrize("where", ["folder", "under a file", "the sample", "an input"])
def test_out_is_checked_before_any_work_and_never_the_sample(tmp_path, capsys, command, where):
    """Item 13: ``--out`` naming a folder (or a place under a file) was found only after the
    work, naming the temp file; ``--out`` naming the sample or an input overwrote it."""
    sample = _sample(tmp_path / "sample.csv")
    sub = _submission(tmp_path / "ours.csv")
    junk = tmp_path / "junk.csv"  # not a submission: an input read before --out is checked fails first
    junk.write_text("not,a,submission\n")
    (tmp_path / "folder").mkdir()
    out = {"folder": tmp_path / "folder", "under a file": sub / "x.csv", "the sample": sample, "an input": sub}[where]
    before = {p: p.read_bytes() for p in (sample, sub)}
    inputs = [sub] if where == "an input" else [junk]
    run = _merge if command == "merge" else _submit_merge
    rc, _, err = run(capsys, *inputs, "--sample", sample, "--out", out)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --out:"), err
    assert ".tmp" not in err
    assert {p: p.read_bytes() for p in (sample, sub)} == before
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------- 14. a teammate's CSV: BOM, malformed rows


def test_a_teammate_csv_with_a_byte_order_mark_merges(tmp_path, capsys):
    """Item 14: a teammate CSV starting with a UTF-8 BOM validated OK but the merge refused it."""
    sample = _sample(tmp_path / "sample.csv")
    ours, theirs = _submission(tmp_path / "ours.csv"), _submission(tmp_path / "theirs.csv", bom=True)
    assert validate_submission(theirs, sample) == []
    rc, _, err = _merge(capsys, ours, theirs, "--sample", sample, "--out", tmp_path / "m.csv")
    assert rc == 0, err
    assert (tmp_path / "m.csv").read_bytes() == ours.read_bytes()
    rc, _, err = _submit_merge(capsys, theirs, "--sample", sample, "--out", tmp_path / "j.csv")
    assert rc == 0, err
    assert (tmp_path / "j.csv").read_bytes() == ours.read_bytes()


def test_a_malformed_teammate_row_costs_only_that_inputs_cells_for_that_image(tmp_path, capsys):
    """Item 14: one malformed row (5 fields, width ``64.0``, a repeated ID) aborted the whole
    merge (exit 2); it costs that input's cells on that image, and the summary lists it."""
    sample = _sample(tmp_path / "sample.csv")
    ours = _submission(tmp_path / "ours.csv")
    theirs = _csv(tmp_path / "theirs.csv", [
        ("img0", SIZE, SIZE, _pred(0), "extra"),  # 5 fields
        ("img1", "64.0", SIZE, _pred(1)),  # width not an integer
        ("img2", SIZE, SIZE, _pred(2)),
        ("img2", SIZE, SIZE, ""),  # repeated ID
    ])
    out = tmp_path / "m.csv"
    rc, stdout, err = _merge(capsys, ours, theirs, "--sample", sample, "--out", out, "--unmatched", "take",
                             "--weights", "1,3")
    assert rc == 0, err
    assert read_submission(out) == read_submission(ours)  # "take": our cells alone, our scores
    summary = [line for line in stdout.splitlines() if line.startswith("input 1: malformed row")]
    assert len(summary) == 1 and "on 3 image(s)" in summary[0], stdout
    assert "'img0'" in summary[0] and "5 fields" in summary[0]


# ------------------------------------------- 16. litter: one line per record, repeats summarised


def test_the_summary_of_99998_failures_is_short_and_an_id_never_splits_a_line(tmp_path):
    """Item 16: 99,998 failures printed 6.8 MB (one line each); an ID with a newline split
    its summary line. Failures of the same reason are one line with a count and the first IDs."""
    from hpa_kernel.run.summary import RunSummary

    failures = {f"id{k:05d}": f"/data/test/id{k:05d}_red.png: missing file" for k in range(99_998)}
    failures["evil\nfailed: forged"] = "ID 'evil\\nfailed: forged' is not a safe file name"
    failures["odd"] = "ValueError: two\nlines"
    text = RunSummary(out=tmp_path / "s.csv", n_images=100_000, n_done=100_000, failures=failures).format()
    assert len(text) < 2_000, f"{len(text)} bytes"
    failed = [ln for ln in text.splitlines() if ln.startswith("failed: ")]
    assert len(failed) == 3 and failed[0].startswith("failed: 99998 images with the same reason, e.g. id00000, id00001")
    assert failed[1:] == ["failed: evil\\nfailed: forged: ID 'evil\\nfailed: forged' is not a safe file name",
                          "failed: odd: ValueError: two\\nlines"]


def test_many_failing_images_print_little_even_on_stderr(tmp_path):
    """Item 16: 99,998 failures wrote 25 MB to stderr even with ``-q`` (two warnings per
    image). The log keeps the first few of each kind and says the summary counts the rest;
    here 300 images (each fails fast: its files are missing) print about what 10 would."""
    import subprocess
    import sys

    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    ids = [f"id{k:04d}" for k in range(300)] + ["x\ny"]
    _csv(data / "sample_submission.csv", [(i, SIZE, SIZE, "") for i in ids])
    out = tmp_path / "s.csv"
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--out", str(out),
                        "--device", "cpu", "--no-progress", "-q", "--no-verify"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(r.stdout) < 3_000 and len(r.stderr) < 8_000, (len(r.stdout), len(r.stderr))
    assert "failed: 300 images with the same reason" in r.stdout and "failed: x\\ny: " in r.stdout
    assert "more like this are not logged" in r.stderr
    assert not any(line.startswith("y") for line in (r.stdout + r.stderr).splitlines())
    assert list(read_submission(out)) == ids  # every ID still has its row
