"""Hardening, round 2 (part B) (RELIABILITY.md): each test names the defect of issue 23 it
guards against and fails if it comes back.

The tests drive the command line (``hpa_kernel.submit.main``, or a subprocess where the
old behaviour was a hang or a second process is needed) and public functions, and state
what must hold: every sample ID keeps its row, nothing outside the output folder is
touched, a bad start is refused with one line (exit 2) before any work.
"""

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

from conftest import write_manifest
from hpa_kernel.submit import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    """``submit.main(argv)`` -> (exit status, stdout, stderr); argparse exits count too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path: Path) -> dict[str, str]:
    from hpa_kernel.formats.submission import read_submission

    return {k: v[2] for k, v in read_submission(path).items()}


def _ids(data: Path) -> list[str]:
    return list(pd.read_csv(data / "sample_submission.csv")["ID"])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _cli(data: Path, manifest: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(manifest),
            "--out", str(out), "--no-progress", "-q", "--device", "cpu", *map(str, extra)]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two small (256 px) synthetic images: the quickest complete run."""
    from hpa_kernel.tools.synthetic import write_dataset

    out = tmp_path_factory.mktemp("tiny_data")
    write_dataset(out, images=2, seed=9400, sizes=(256,), depth=8, split="test", progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_clean(tmp_path_factory, tiny_data, tiny_manifest) -> dict[str, str]:
    """The rows of an undisturbed run over ``tiny_data``."""
    out = tmp_path_factory.mktemp("tiny_clean") / "submission.csv"
    assert main(["--data-dir", str(tiny_data), "--weights", str(tiny_manifest), "--out", str(out),
                 "--no-progress", "-q", "--device", "cpu"]) == 0
    return _rows(out)


# ------------------------------------------------------ 4. --save-overlays failures


def test_an_unusable_save_overlays_folder_is_refused_at_start_up(tmp_path, capsys, tiny_data, tiny_manifest):
    """Defect 4: ``--save-overlays`` naming a file (or a folder under a file) emptied every row."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for overlays in (blocker, blocker / "sub"):
        out = tmp_path / "submission.csv"
        rc, stdout, err = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                               "--no-progress", "-q", "--device", "cpu", "--save-overlays", overlays)
        assert rc == 2, (overlays, stdout)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --save-overlays") and str(blocker) in lines[0]
        assert not out.exists() and not out.with_name(out.name + ".journal").exists()
    assert blocker.read_text() == "not a folder"


def test_an_overlay_that_cannot_be_written_costs_no_row(tmp_path, capsys, tiny_data, tiny_manifest, tiny_clean):
    """Defect 4: an overlay failure during the run emptied the image's row."""
    first, second = _ids(tiny_data)
    overlays = tmp_path / "ov"
    (overlays / f"{first}.png").mkdir(parents=True)  # a folder where its overlay goes: cannot be replaced
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                         "--no-progress", "-q", "--device", "cpu", "--save-overlays", overlays)
    assert _rows(out) == tiny_clean  # every row, as without overlays
    assert rc == 0, stdout
    assert any(ln.startswith("warning: overlay failed for 1 image(s)") and first in ln for ln in stdout.splitlines())
    assert (overlays / f"{second}.png").is_file()


# ------------------------------------------------------ 5. the export's settings


@pytest.mark.slow
def test_a_resume_with_save_cells_added_fills_the_export(tmp_path, small_dataset, tiny_manifest):
    """Defect 5: a killed run restarted with ``--save-cells`` added left the resumed images
    out of the export."""
    from hpa_kernel.formats.cells import read_cells

    ref_out, ref_cells = tmp_path / "ref.csv", tmp_path / "ref_cells"
    r = subprocess.run(_cli(small_dataset, tiny_manifest, ref_out, "--tta", "--save-cells", ref_cells),
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out, cells = tmp_path / "submission.csv", tmp_path / "cells"
    journal = out.with_name(out.name + ".journal")
    proc = subprocess.Popen(_cli(small_dataset, tiny_manifest, out, "--tta", "--workers", "0"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text(errors="replace").count("\n") >= 3:  # header + 2 rows
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert journal.exists() and not out.exists(), "the run finished before it could be killed"
    r = subprocess.run(_cli(small_dataset, tiny_manifest, out, "--tta", "--save-cells", cells),
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref_out.read_bytes()
    got, ref = read_cells(cells), read_cells(ref_cells)
    assert sorted(got.images["ID"]) == sorted(_ids(small_dataset))  # the resumed images too
    key = ["ID", "cell_id"]
    pd.testing.assert_frame_equal(got.cells.sort_values(key).reset_index(drop=True),
                                  ref.cells.sort_values(key).reset_index(drop=True))


def test_an_export_of_other_weights_is_refused_unless_overwritten(tmp_path, capsys, tiny_data, tiny_checkpoint,
                                                                   tiny_manifest):
    """Defect 5: a rerun with other ``--weights`` into the same ``--save-cells`` folder kept
    the old scores ("already present")."""
    from hpa_kernel.formats.cells import read_cells, scores
    from hpa_kernel.team_merge import main as merge_main

    other = write_manifest(tmp_path / "other", tiny_checkpoint, step_weights={"step1": 0.9, "step2": 0.1})
    cells = tmp_path / "cells"
    common = ("--data-dir", tiny_data, "--no-progress", "-q", "--device", "cpu", "--save-cells", cells)
    rc, _, _ = _run(capsys, *common, "--weights", tiny_manifest, "--out", tmp_path / "a.csv")
    assert rc == 0
    before = scores(read_cells(cells).cells)
    out = tmp_path / "b.csv"
    rc, stdout, err = _run(capsys, *common, "--weights", other, "--out", out)
    assert rc == 2, stdout
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(cells) in lines[0] and "--overwrite-cells" in lines[0]
    assert not out.exists()
    np.testing.assert_array_equal(scores(read_cells(cells).cells), before)  # untouched
    rc, _, _ = _run(capsys, *common, "--weights", other, "--out", out, "--overwrite-cells")
    assert rc == 0
    merged = tmp_path / "merged.csv"
    assert merge_main([str(cells), "--sample", str(tiny_data / "sample_submission.csv"), "--out", str(merged), "-q"]) == 0
    assert merged.read_bytes() == out.read_bytes()  # the export holds the new weights' scores
    assert not np.array_equal(scores(read_cells(cells).cells), before)
    rc, _, _ = _run(capsys, *common, "--weights", other, "--out", tmp_path / "c.csv")  # same settings: resumes
    assert rc == 0


def test_a_parallel_run_checks_each_shard_export_before_starting(tmp_path, capsys, tiny_data, tiny_manifest):
    """Defect 5: a ``--parallel`` parent refuses an export of other settings in a shard's
    folder at start-up (no shard process is started); ``--overwrite-cells`` reaches the
    shards on their first try only (a rerun resumes its own export)."""
    from hpa_kernel.formats.cells import CellsWriter
    from hpa_kernel.run.options import build_parser, shard_argv

    cells = tmp_path / "cells"
    CellsWriter(cells / "shard-1-of-2", models=["m0"], fingerprint="0123456789abcdef").close()
    out = tmp_path / "submission.csv"
    rc, stdout, err = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                           "--no-progress", "-q", "--parallel", "2", "--device", "cpu", "--save-cells", cells)
    assert rc == 2 and "shard-1-of-2" in err and "--overwrite-cells" in err, (stdout, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells"]  # no part, log or journal
    parser = build_parser()
    args = parser.parse_args(["--save-cells", "c", "--overwrite-cells"])
    first = parser.parse_args(shard_argv(args, Path("d"), (0, 2), "cpu", Path("o"), None, rerun=False))
    again = parser.parse_args(shard_argv(args, Path("d"), (0, 2), "cpu", Path("o"), None, rerun=True))
    assert first.overwrite_cells and not again.overwrite_cells


# ------------------------------------------------------ 8. one run per --out


_HOLDER = """
import sys, time
from hpa_kernel.run.lock import hold_output
with hold_output(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_the_same_out_is_refused_at_start_up_and_a_dead_runs_lock_taken_over(
        tmp_path, capsys, tiny_data, tiny_manifest, tiny_clean):
    """Defect 8: a second ``--parallel`` run on a busy ``--out`` started shards that failed
    on the locks, shared their log files and wrote a file of empty rows; a plain run is
    refused the same way; a lock left by a killed run is taken over with a warning."""
    out = tmp_path / "submission.csv"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (("--parallel", "2"), ()):
            rc, stdout, err = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                                   "--no-progress", "-q", "--device", "cpu", *extra)
            assert rc == 2, (extra, stdout)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "another run" in lines[0] and f"pid {holder.pid}" in lines[0], extra
            assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv.lock"], extra  # nothing else
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "submission.csv.lock").exists()  # what a killed run leaves
    rc, stdout, _ = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                         "--no-progress", "-q", "--device", "cpu")
    assert rc == 0, stdout
    assert any("warning: took over the lock" in ln and f"pid {holder.pid}" in ln and "no longer running" in ln
               for ln in stdout.splitlines()), stdout
    assert _rows(out) == tiny_clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # the lock released


# ------------------------------------------------------ 11. budget cuts


def test_rows_cut_by_the_time_budget_are_counted_and_exit_1(tmp_path, capsys, tiny_data, tiny_manifest):
    """Defect 11: a budget that cut rows (written empty) still said "0 failed" and exited 0;
    the budget's use is reported when it is not hit too."""
    out = tmp_path / "cut.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out,
                         "--no-progress", "-q", "--device", "cpu", "--time-budget", "0.01")
    n = len(_ids(tiny_data))
    assert set(_rows(out).values()) == {""}  # every row there, all cut
    assert rc == 1, stdout
    assert f"{n} cut by the time budget" in stdout.splitlines()[0]
    assert any(ln.startswith("time budget 0.01 s: used") and f"{n} image(s) not predicted" in ln
               for ln in stdout.splitlines()), stdout
    assert "validation: OK" in stdout
    rc, stdout, _ = _run(capsys, "--data-dir", tiny_data, "--weights", tiny_manifest, "--out", tmp_path / "ok.csv",
                         "--no-progress", "-q", "--device", "cpu", "--time-budget", "1h")
    assert rc == 0 and "cut by the time budget" not in stdout and "not predicted" not in stdout
    assert any(ln.startswith("time budget 3600 s: used") and ln.endswith("%)") for ln in stdout.splitlines()), stdout


# ------------------------------------------------------ 12. links and special files


def test_links_beside_the_output_and_in_the_export_are_not_followed(tmp_path, capsys, tiny_data, tiny_manifest,
                                                                     tiny_clean):
    """Defect 12: a symlink at ``<out>.journal`` was followed and the file outside emptied
    and overwritten; so were links in the ``--save-cells`` folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("precious\n")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "submission.csv"
    base = ("--data-dir", tiny_data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q", "--device", "cpu")
    for beside in ("submission.csv.journal", "submission.csv.lock"):
        (work / beside).symlink_to(victim)
        rc, stdout, err = _run(capsys, *base)
        assert rc == 2, (beside, stdout)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and beside in lines[0] and "symbolic link" in lines[0], beside
        assert victim.read_text() == "precious\n" and not out.exists()
        (work / beside).unlink()
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "images.csv").symlink_to(victim)
    rc, stdout, _ = _run(capsys, *base, "--save-cells", cells)
    assert rc == 0 and _rows(out) == tiny_clean
    assert victim.read_text() == "precious\n"
    assert any("per-cell export" in ln and "disabled" in ln and "symbolic link" in ln for ln in stdout.splitlines())


def test_fifos_at_the_journal_and_in_the_export_do_not_hang_the_run(tmp_path, tiny_data, tiny_manifest, tiny_clean):
    """Defect 12: ``--save-cells DIR`` with a FIFO inside hung (and so did a FIFO at
    ``<out>.journal``); each is refused at once, naming it."""
    out = tmp_path / "submission.csv"
    os.mkfifo(tmp_path / "submission.csv.journal")
    r = subprocess.run(_cli(tiny_data, tiny_manifest, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "submission.csv.journal is not a regular file" in r.stderr, r.stderr
    os.unlink(tmp_path / "submission.csv.journal")
    cells = tmp_path / "cells"
    cells.mkdir()
    os.mkfifo(cells / "images.csv")
    r = subprocess.run(_cli(tiny_data, tiny_manifest, out, "--save-cells", cells), env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _rows(out) == tiny_clean
    assert "images.csv is not a regular file" in r.stdout and "disabled" in r.stdout
