"""Hostile and unlucky inputs (RELIABILITY.md, "Hardening"): each test names its defect.

Every test drives the command line (``hpa_kernel.submit.main``) or a public function as a
user would meet it, and states what must hold: every sample ID keeps its row, nothing
outside the data and output folders is read or written, a bad value is refused at start-up
with one line naming it (exit 2), and what is lost is the bad input's own row at most.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_manifest
from hpa_kernel.submit import main

CH = ("red", "green", "blue", "yellow")


# ----------------------------------------------------------------------------- helpers


def _run(capsys, *argv) -> tuple[int, str, str]:
    """``submit.main(argv)`` -> (exit status, stdout, stderr); argparse exits count too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        rc = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path: Path) -> dict[str, str]:
    from hpa_kernel.formats.submission import read_submission

    return {k: v[2] for k, v in read_submission(path).items()}


def _sample_lines(folder: Path) -> list[str]:
    return (folder / "sample_submission.csv").read_text().splitlines()


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write_rgby(folder: Path, image_id: str, rgby: np.ndarray) -> None:
    (folder / "test").mkdir(parents=True, exist_ok=True)
    for i, ch in enumerate(CH):
        assert cv2.imwrite(str(folder / "test" / f"{image_id}_{ch}.png"), np.ascontiguousarray(rgby[..., i]))


def _first_id(folder: Path) -> str:
    return _sample_lines(folder)[1].split(",")[0]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, small_dataset, tiny_manifest):
    """The rows of an undisturbed run over ``small_dataset`` (what a fault may not change)."""
    out = tmp_path_factory.mktemp("clean") / "submission.csv"
    assert main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(out),
                 "--no-progress", "-q"]) == 0
    return _rows(out)


# ----------------------------------------------------------- 1. an unfit classifier


def _unfit_checkpoints(folder: Path) -> dict[str, Path]:
    import torch

    from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint

    torch.manual_seed(1)
    found = {}
    folder.mkdir(parents=True, exist_ok=True)
    found["10 classes"] = save_checkpoint(PuzzleCAM("resnet10t", num_classes=10), folder / "c10.pt",
                                          image_size=64, crop_size=32)
    found["25 classes"] = save_checkpoint(PuzzleCAM("resnet10t", num_classes=25), folder / "c25.pt",
                                          image_size=64, crop_size=32)
    found["3 channels"] = save_checkpoint(PuzzleCAM("resnet10t", in_chans=3), folder / "rgb.pt",
                                          image_size=64, crop_size=32)
    found["mean of 3"] = save_checkpoint(PuzzleCAM("resnet10t"), folder / "mean3.pt",
                                         image_size=64, crop_size=32, mean=(0.5, 0.5, 0.5))
    found["crop 0"] = save_checkpoint(PuzzleCAM("resnet10t"), folder / "crop0.pt", image_size=64, crop_size=0)
    return found


@pytest.mark.slow
def test_an_unfit_classifier_is_skipped_and_the_good_one_still_scores(tmp_path, capsys, small_dataset,
                                                                       tiny_checkpoint, clean_run):
    """Defect 1: a checkpoint that loads but does not fit the kernel must not empty the file."""
    for what, bad in _unfit_checkpoints(tmp_path / "bad").items():
        folder = tmp_path / what.replace(" ", "_")
        manifest = write_manifest(folder, tiny_checkpoint)
        raw = json.loads(manifest.read_text())
        shutil.copy(bad, folder / "bad.pt")
        raw["classifiers"] = [{"path": "model.pt", "weight": 1.0}, {"path": "bad.pt", "weight": 1.0}]
        manifest.write_text(json.dumps(raw))
        out = folder / "submission.csv"
        rc, stdout, _ = _run(capsys, "--data-dir", small_dataset, "--weights", manifest, "--out", out,
                             "--no-progress", "-q", "--no-verify")
        assert rc == 1, what
        assert "bad.pt" in stdout, what  # the summary names the skipped file and why
        assert _rows(out) == clean_run, what  # the good model's rows, untouched


# ----------------------------------------------------------- 2. IDs are not paths


@pytest.mark.parametrize("bad_id", ["../outside", "sub/inner", "ABSOLUTE", "..", "a\\b", ".hidden", "sp ace"])
def test_an_id_that_is_a_path_gets_an_empty_row_and_nothing_outside_is_touched(tmp_path, capsys, small_dataset,
                                                                                tiny_manifest, bad_id):
    """Defect 2: IDs never leave ``test/`` (reading) or the overlay folder (writing)."""
    data = _copy_dataset(small_dataset, tmp_path / "data")
    good = _sample_lines(data)[1].split(",", 1)[1]  # a real image's size columns
    if bad_id == "ABSOLUTE":
        bad_id = str(tmp_path / "abs" / "img")
    # plant a valid image where the ID would point, so that reading it would give cells
    src = data / "test" / f"{_first_id(data)}"
    target = (data / "test" / bad_id)
    for ch in CH:
        p = Path(f"{target}_{ch}.png")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f"{src}_{ch}.png", p)
        except OSError:
            pass
    with open(data / "sample_submission.csv", "a") as f:
        f.write(f"{bad_id},{good}\n")
    overlays = tmp_path / "work" / "overlays"
    out = tmp_path / "work" / "submission.csv"
    before = sorted(p for p in tmp_path.rglob("*"))
    rc, stdout, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out,
                         "--save-overlays", overlays, "--no-progress", "-q")
    rows = _rows(out)
    assert rows[bad_id] == ""  # its row, empty
    assert rc == 1 and bad_id in stdout  # listed with the reason
    after = sorted(p for p in tmp_path.rglob("*"))
    created = [p for p in after if p not in before]
    # the output folder itself (out's parent, created by the run) and the overlay folder's contents only
    assert all(p in (out, out.parent, overlays) or overlays in p.parents for p in created), created
    assert len([p for p in overlays.iterdir()]) == len(rows) - 1  # every good image drawn, in the folder


# ----------------------------------------------------------- 4. values are validated at start-up


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_classes", 0),
        ("top_classes", -3),
        ("min_confidence", float("nan")),
        ("min_confidence", -0.5),
        ("batch_size", 0),
        ("image_size", 0),
        ("crop_size", 0),
        ("step_weights", {"step1": float("nan"), "step2": 0.5}),
        ("step_weights", {"step1": -1, "step2": 0.5}),
        ("step_weights", {"step1": "heavy", "step2": 0.5}),
        ("top_classes", "many"),
        ("classifiers", [{"path": "model.pt", "weight": "heavy"}]),
        ("classifiers", [{"path": "model.pt", "weight": float("nan")}]),
        ("classifiers", [{"path": "model.pt", "weight": -1.0}]),
        ("classifiers", [{"path": "model.pt", "weight": 0.0}]),
        ("classifiers", "model.pt"),
        ("segmentation", "hpa"),
    ],
)
def test_bad_manifest_values_are_refused_at_start_up(tmp_path, capsys, small_dataset, tiny_checkpoint, field, value):
    """Defect 4: one line naming the field, exit 2, before any image is read."""
    manifest = write_manifest(tmp_path / "w", tiny_checkpoint)
    raw = json.loads(manifest.read_text())
    raw[field] = value
    manifest.write_text(json.dumps(raw))  # NaN is written as the token NaN, as Python's json reads it
    out = tmp_path / "submission.csv"
    rc, _, err = _run(capsys, "--data-dir", small_dataset, "--weights", manifest, "--out", out, "--no-progress")
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert rc == 2, (field, value, err)
    assert len(lines) == 1 and field in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--time-budget", "nan"),
        ("--time-budget", "-5"),
        ("--time-budget", "0"),
        ("--time-budget", "infm"),
        ("--max-images", "-1"),
        ("--batch-size", "0"),
        ("--workers", "-1"),
    ],
)
def test_bad_option_values_are_refused_at_start_up(tmp_path, capsys, small_dataset, tiny_manifest, flag, value):
    """Defect 4: a CLI value that would empty every row is refused, naming the option."""
    out = tmp_path / "submission.csv"
    rc, _, err = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out, flag, value,
                      "--no-progress")
    assert rc == 2, err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


# ----------------------------------------------------------- 5. bounded memory


def _png_header_only(path: Path, width: int, height: int, bit_depth: int = 8) -> None:
    """A PNG whose IHDR declares ``width`` x ``height`` and whose data is a short stub."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path, capsys, small_dataset, tiny_manifest,
                                                                clean_run):
    """Defect 5: the PNG header is read first; a huge declared size never reaches the decoder."""
    data = _copy_dataset(small_dataset, tmp_path / "data")
    for ch in CH:
        _png_header_only(data / "test" / f"huge_{ch}.png", 30000, 30000, 16)
    with open(data / "sample_submission.csv", "a") as f:
        f.write("huge,30000,30000,\n")
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    rows = _rows(out)
    assert rc == 1 and rows.pop("huge") == ""
    assert rows == clean_run
    line = next(ln for ln in stdout.splitlines() if ln.startswith("failed: huge"))
    assert "30000x30000" in line and "pixel" in line  # says why: over the cap, not "cannot decode"


def test_the_pixel_cap_is_configurable(tmp_path, capsys, small_dataset, tiny_manifest):
    """Defect 5: ``--max-pixels`` lowers (or raises) the cap; images over it get empty rows."""
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out,
                         "--max-pixels", "300000", "--no-progress", "-q")
    rows = _rows(out)
    failed = [ln for ln in stdout.splitlines() if ln.startswith("failed:")]
    sizes = {ln.split(",")[0]: int(ln.split(",")[1]) * int(ln.split(",")[2]) for ln in _sample_lines(small_dataset)[1:]}
    assert rc == 1
    assert sorted(ln.split(":")[1].strip() for ln in failed) == sorted(i for i, n in sizes.items() if n > 300000)
    assert all(rows[i] == "" for i, n in sizes.items() if n > 300000)


def _bomb_submission(folder: Path, width: int, height: int, inflated: int) -> tuple[Path, Path]:
    """A submission whose one mask string inflates to ``inflated`` bytes (a zlib bomb)."""
    mask = base64.b64encode(zlib.compress(b"1" * inflated, 9)).decode()
    sample = folder / "sample_submission.csv"
    sample.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\nbomb,{width},{height},\n")
    sub = folder / "submission.csv"
    sub.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\nbomb,{width},{height},0 0.5 {mask}\n")
    return sub, sample


def test_the_validator_does_not_inflate_a_mask_past_what_the_image_can_hold(tmp_path):
    """Defect 5: a 64x64 image's mask cannot need 200 MB of run lengths; the validator stops early."""
    from hpa_kernel.formats.submission import validate_submission

    sub, sample = _bomb_submission(tmp_path, 64, 64, 200_000_000)
    assert sub.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        problems = validate_submission(sub, sample)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert problems and "bomb" in problems[0]
    assert peak < 50_000_000, f"validator peaked at {peak / 1e6:.0f} MB"


# ----------------------------------------------------------- 6. non-regular files


@pytest.mark.slow
def test_a_fifo_channel_file_does_not_hang_the_run(tmp_path, small_dataset, tiny_manifest):
    """Defect 6: a FIFO where a PNG should be (no size in the sample) is refused, never opened."""
    data = _copy_dataset(small_dataset, tmp_path / "data")
    lines = _sample_lines(data)
    victim = lines[1].split(",")[0]
    lines[1] = f"{victim},,,"  # no size: the kernel must find one without opening the FIFO
    (data / "sample_submission.csv").write_text("\n".join(lines) + "\n")
    p = data / "test" / f"{victim}_green.png"
    p.unlink()
    os.mkfifo(p)
    out = tmp_path / "submission.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(tiny_manifest),
         "--out", str(out), "--no-progress", "-q"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"failed: {victim}" in proc.stdout and "not a regular file" in proc.stdout
    assert _rows(out)[victim] == ""


# ----------------------------------------------------------- 7. failed rows are retried on resume


def test_a_resume_retries_the_rows_that_failed(tmp_path, capsys, small_dataset, tiny_manifest, clean_run):
    """Defect 7: an image fixed between the kill and the restart gets its row on resume."""
    data = _copy_dataset(small_dataset, tmp_path / "data")
    victim = _first_id(data)  # the first image: journaled (as failed) before the others run
    p = data / "test" / f"{victim}_yellow.png"
    saved = p.read_bytes()
    p.unlink()
    out = tmp_path / "submission.csv"
    journal = out.with_name(out.name + ".journal")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(tiny_manifest),
           "--out", str(out), "--no-progress", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and victim in journal.read_text(errors="replace"):
            proc.kill()  # killed after the failed row was journaled
            break
        time.sleep(0.02)
    proc.wait()
    assert not out.exists() and journal.exists(), "the run finished before it could be killed"
    p.write_bytes(saved)  # the image is fixed before the restart
    rc, _, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    assert rc == 0
    assert _rows(out) == clean_run


# ----------------------------------------------------------- 8. exit status matches the outcome


def test_out_naming_a_directory_is_refused_before_any_work(tmp_path, capsys, small_dataset, tiny_manifest):
    out = tmp_path / "outdir"
    out.mkdir()
    t0 = time.perf_counter()
    rc, _, err = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out, "--no-progress")
    assert rc == 2 and "--out" in err and str(out) in err
    assert "Traceback" not in err
    assert time.perf_counter() - t0 < 30


def test_a_sample_size_that_differs_from_the_png_is_not_exit_0(tmp_path, capsys, small_dataset, tiny_manifest,
                                                               clean_run):
    """Defect 8: the written file must validate, or the exit status says it does not."""
    data = _copy_dataset(small_dataset, tmp_path / "data")
    lines = _sample_lines(data)
    victim, w, h, _ = lines[1].split(",")
    lines[1] = f"{victim},{int(w) + 10},{h},"
    (data / "sample_submission.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    assert rc == 1
    assert f"failed: {victim}" in stdout and "sample" in stdout.split(f"failed: {victim}")[1].splitlines()[0]
    assert "validation: OK" in stdout  # the file written is valid: the mismatched image's row is empty
    rows = _rows(out)
    assert rows.pop(victim) == ""
    clean = dict(clean_run)
    clean.pop(victim)
    assert rows == clean


# ----------------------------------------------------------- 9. input reading


def test_a_sample_with_a_utf8_bom_is_read(tmp_path, capsys, small_dataset, tiny_manifest, clean_run):
    data = _copy_dataset(small_dataset, tmp_path / "data")
    p = data / "sample_submission.csv"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    out = tmp_path / "submission.csv"
    rc, _, err = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    assert rc == 0, err
    assert _rows(out) == clean_run


def test_a_sample_that_is_not_utf8_is_named_in_the_error(tmp_path, capsys, small_dataset, tiny_manifest):
    data = _copy_dataset(small_dataset, tmp_path / "data")
    p = data / "sample_submission.csv"
    p.write_bytes(p.read_bytes() + "caf\u00e9,512,512,\n".encode("latin-1"))
    out = tmp_path / "submission.csv"
    rc, _, err = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1
    assert "sample_submission.csv" in lines[0] and "UTF-8" in lines[0]


def test_a_repeated_header_line_is_not_a_ghost_row(tmp_path, capsys, small_dataset, tiny_manifest, clean_run):
    data = _copy_dataset(small_dataset, tmp_path / "data")
    lines = _sample_lines(data)
    lines.insert(3, lines[0])
    (data / "sample_submission.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    assert "ID" not in _rows(out)
    assert _rows(out) == clean_run
    assert "header" in stdout  # a warning in the summary says the line was skipped
    assert rc == 0


def test_a_16_bit_image_holding_8_bit_values_is_read_as_8_bit_with_a_warning(tmp_path, capsys, small_dataset,
                                                                             tiny_manifest, clean_run):
    data = _copy_dataset(small_dataset, tmp_path / "data")
    lines = _sample_lines(data)
    eight = None
    for ln in lines[1:]:
        i = ln.split(",")[0]
        if cv2.imread(str(data / "test" / f"{i}_red.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint8:
            eight = i
            break
    assert eight is not None
    for ch in CH:
        p = data / "test" / f"{eight}_{ch}.png"
        cv2.imwrite(str(p), cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.uint16))
    out = tmp_path / "submission.csv"
    rc, stdout, _ = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q")
    assert _rows(out) == clean_run  # the same cells and scores as the 8-bit file
    assert eight in stdout and "16-bit" in stdout  # and the summary warns
    assert rc == 0


# ----------------------------------------------------------- 10. litter and messages


def test_the_output_follows_the_umask(tmp_path, capsys, small_dataset, tiny_manifest):
    out = tmp_path / "submission.csv"
    old = os.umask(0o022)
    try:
        rc, _, _ = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out, "--no-progress",
                        "-q", "--max-images", "1")
    finally:
        os.umask(old)
    assert rc == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_a_temp_file_left_by_a_killed_write_is_cleaned_up(tmp_path, capsys, small_dataset, tiny_manifest):
    """Defect 10: the writer's temp file (``.<name>.<random>.tmp`` beside the output) that a
    kill during the final write leaves behind is removed by the next run."""
    out = tmp_path / "submission.csv"
    (tmp_path / ".submission.csv.k1ll3d.tmp").write_text("ID,ImageWidth,ImageHeight,PredictionString\nhalf")
    (tmp_path / "keep.tmp").write_text("not ours")
    rc, _, _ = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out, "--no-progress",
                    "-q", "--max-images", "1")
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "submission.csv"]


@pytest.mark.parametrize("content", [b"\xff\xfe not a journal \x00\n", b"[1]\n", b"null\n",
                                     b'{"fingerprint": "x"}\n{"id": 3}\n', b'{"fingerprint": 7}\n'])
def test_a_broken_journal_starts_afresh_and_names_no_resume(tmp_path, capsys, small_dataset, tiny_manifest, content):
    """Defect 10: a journal that cannot be read never stops the run; the warning says how to skip it."""
    out = tmp_path / "submission.csv"
    journal = out.with_name(out.name + ".journal")
    journal.write_bytes(content)
    rc, out_text, err = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out,
                             "--no-progress", "--max-images", "1")
    assert rc == 0, err
    # a warning in the summary (stdout): under pytest, logging does not reach capsys's stderr
    assert "--no-resume" in out_text + err


def test_a_classifier_that_pickles_code_is_refused_naming_the_global(tmp_path, capsys, small_dataset,
                                                                      tiny_checkpoint):
    """Defect 10: the refusal names what was refused on this torch (its message text changed)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    manifest = write_manifest(tmp_path / "w", tiny_checkpoint)
    import torch

    torch.save({"state_dict": {}, "meta": {"x": Evil()}}, tmp_path / "w" / "model.pt", pickle_module=pickle)
    rc, _, stderr = _run(capsys, "--data-dir", small_dataset, "--weights", manifest, "--out", tmp_path / "s.csv",
                         "--no-progress", "-q", "--no-verify")
    assert rc == 2  # the only classifier: nothing can run (issue 22), and the error line says why
    line = next(ln for ln in stderr.splitlines() if "model.pt" in ln and "refused" in ln)
    assert line.startswith("error: no usable classifier") and "system" in line  # posix.system / os.system
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------- 3. one run per journal


def _bigger_dataset(src: Path, dst: Path, copies: int) -> Path:
    """``src``'s images repeated under new IDs: a run long enough to be caught running."""
    data = _copy_dataset(src, dst)
    lines = _sample_lines(data)
    extra = []
    for k in range(copies):
        for ln in lines[1:]:
            i, rest = ln.split(",", 1)
            for ch in CH:
                shutil.copy(data / "test" / f"{i}_{ch}.png", data / "test" / f"{i}c{k}_{ch}.png")
            extra.append(f"{i}c{k},{rest}")
    (data / "sample_submission.csv").write_text("\n".join(lines + extra) + "\n")
    return data


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, small_dataset, tiny_manifest):
    """Defect 3: two runs on one ``--out`` would interleave their journal rows; the second refuses."""
    data = _bigger_dataset(small_dataset, tmp_path / "data", copies=4)
    out = tmp_path / "submission.csv"
    journal = out.with_name(out.name + ".journal")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    first = subprocess.Popen(
        [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(tiny_manifest),
         "--out", str(out), "--no-progress", "-q", "--workers", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not (journal.exists() and journal.stat().st_size > 60):
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before the second could start"
    rc, _, err = _run(capsys, "--data-dir", data, "--weights", tiny_manifest, "--out", out, "--no-progress", "-q",
                      "--tta")
    still_running = first.poll() is None
    stdout, stderr = first.communicate(timeout=300)
    assert still_running, "the first run ended before the second was refused: make the data set bigger"
    assert rc == 2 and "another run" in err and str(out) in err  # the --out lock (RELIABILITY.md, round 2 B)
    assert first.returncode == 0, stderr
    from hpa_kernel.formats.submission import validate_submission

    assert validate_submission(out, data / "sample_submission.csv") == []


@pytest.mark.slow
def test_a_resume_never_takes_rows_of_other_options(tmp_path, capsys, small_dataset, tiny_manifest, clean_run):
    """Defect 3: a journal written with other options (here ``--tta``) is not resumed from."""
    out = tmp_path / "submission.csv"
    journal = out.with_name(out.name + ".journal")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(small_dataset), "--weights", str(tiny_manifest),
         "--out", str(out), "--no-progress", "-q", "--tta"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text(errors="replace").count("\n") >= 3:
            proc.kill()
            break
        time.sleep(0.02)
    proc.wait()
    assert journal.exists() and not out.exists(), "the --tta run finished before it could be killed"
    rc, _, _ = _run(capsys, "--data-dir", small_dataset, "--weights", tiny_manifest, "--out", out, "--no-progress",
                    "-q")
    assert rc == 0
    assert _rows(out) == clean_run
