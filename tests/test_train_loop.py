"""The competitor's loop through the command lines, on a tiny synthetic training set (issue 22).

synthetic --split train -> train.prepare -> train (one epoch) -> the files it leaves,
its config.json fed back to train and train.oof, and the user's mistakes in train.*
commands answered in one line (exit 2), never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def run(args: list[str], cwd: Path, code: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == code, f"{args}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A one-epoch run in ``root/run`` (too short for a best.pt: the best is kept from epoch 2)."""
    root = tmp_path_factory.mktemp("loop")
    run(["-m", "hpa_kernel.tools.synthetic", "--out", "data", "--images", "8", "--seed", "1003", "--sizes", "64",
         "--split", "train"], root)
    run(["-m", "hpa_kernel.train.prepare", "--csv", "data/train.csv", "--src", "data/train", "--out", "cache",
         "--size", "64", "--workers", "1", "--folds", "2"], root)
    cfg = {"index_csv": "cache/index.csv", "backbone": "test_resnet", "pretrained": False, "image_size": 64,
           "train_crop": None, "crop_size": 64, "epochs": 1, "batch_size": 8, "workers": 0, "threads": 1,
           "out": "run", "n_folds": 2}
    (root / "cfg.json").write_text(json.dumps(cfg))
    return root, run(["-m", "hpa_kernel.train", "--config", "cfg.json"], root)


def test_a_one_epoch_run_leaves_a_kernel_checkpoint_and_says_which(one_epoch):
    from hpa_kernel.stages.model import CheckpointError, load_checkpoint

    root, p = one_epoch
    assert not (root / "run" / "best.pt").exists()  # the reference's rule: best from epoch 2 on
    model, meta = load_checkpoint(root / "run" / "last_model.pt")  # what the kernel loads
    assert meta["backbone"] == "test_resnet" and meta["epoch"] == 1 and meta["image_size"] == 64
    with pytest.raises(CheckpointError, match="not a Puzzle-CAM checkpoint"):
        load_checkpoint(root / "run" / "last.pt")  # the resumable state is not one
    last = p.stdout.strip().splitlines()[-1]
    assert "best: epoch" not in last
    assert "no best.pt" in last and "last.pt (training state for --resume; the kernel cannot load it)" in last
    assert last.endswith(f"for a manifest: {Path('run') / 'last_model.pt'}")


def test_a_run_with_a_best_names_it_for_the_manifest(one_epoch):
    root, _ = one_epoch
    p = run(["-m", "hpa_kernel.train", "--config", "cfg.json", "--out", "run_best", "--set", "best_from_epoch=1",
             "--epochs", "2", "--set", "plateau_patience=0"], root)
    last = p.stdout.strip().splitlines()[-1]
    assert "best.pt (best val loss, epoch " in last and "last_model.pt (epoch 2 weights)" in last
    assert last.endswith(f"for a manifest: {Path('run_best') / 'best.pt'}")


def test_what_a_competitor_expects_from_a_run(one_epoch):
    """Issue 22 item 6: the run's ETA, the per-class AP of the validation fold, training.png."""
    import pandas as pd

    root, _ = one_epoch
    p = run(["-m", "hpa_kernel.train", "--config", "cfg.json", "--out", "run_report", "--epochs", "2"], root)
    assert "epoch 1/2" in p.stderr and "run ETA " in p.stderr and "for 1 more epoch(s) (ends about " in p.stderr
    assert "run ETA: this was the last epoch" in p.stderr
    table = pd.read_csv(root / "run_report" / "val_class_ap.csv")
    assert len(table) == 19 and list(table.columns) == ["epoch", "class", "name", "positives", "images", "ap"]
    assert table["epoch"].unique().tolist() == [2]  # best.pt's epoch (the best is kept from epoch 2 on)
    assert "per-class AP of" in p.stderr and "mAP (classes with positives)" in p.stderr
    assert pd.read_csv(root / "run_report" / "metrics.csv")["epoch"].tolist() == [1, 2]  # counted as in the log
    assert (root / "run_report" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _interrupt(args: list[str], cwd: Path, marker: str) -> subprocess.CompletedProcess:
    """Start ``args``, send SIGINT once ``marker`` shows in its stderr, return what it printed."""
    import signal

    # a shell that starts jobs in the background (CI runners, `cmd &`) makes them ignore
    # SIGINT, and a Python started so never raises KeyboardInterrupt: give the child the
    # default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + proc.stderr.read()
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


@pytest.mark.slow
def test_ctrl_c_in_train_says_how_to_resume(one_epoch):
    root, _ = one_epoch
    p = _interrupt(["-m", "hpa_kernel.train", "--config", "cfg.json", "--out", "run_int", "--epochs", "500"], root,
                   "epoch 1/500")
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-3000:]
    hint = p.stderr.strip().splitlines()[-1]
    want = f"--config {Path('run_int') / 'config.json'} --resume {Path('run_int') / 'last.pt'}"
    assert hint.startswith("interrupted: resume from the last finished epoch with: python -m hpa_kernel.train ")
    assert hint.endswith(want)
    again = run(["-m", "hpa_kernel.train", *hint.split("hpa_kernel.train ", 1)[1].split(), "--epochs", "2"], root)
    assert "resumed from" in again.stderr


@pytest.mark.slow
def test_ctrl_c_in_submit_says_how_to_resume(one_epoch, tiny_manifest):
    root, _ = one_epoch
    run(["-m", "hpa_kernel.tools.synthetic", "--out", "many", "--images", "12", "--seed", "9002", "--sizes", "64"],
        root)
    args = ["-m", "hpa_kernel.submit", "--data-dir", "many", "--weights", str(tiny_manifest), "--out", "int.csv",
            "--device", "cpu", "--no-progress", "--workers", "0"]
    p = _interrupt(args, root, "Step 2 crops")
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == ("interrupted: the rows finished so far are kept in the journal(s) "
                                                "beside --out (<out>.journal); run the same command again to resume")
    run(args, root)
    assert (root / "int.csv").is_file()


@pytest.mark.slow
def test_the_runs_config_json_loads_back_in_train_and_oof(one_epoch):
    root, _ = one_epoch
    p = run(["-m", "hpa_kernel.train", "--config", "run/config.json", "--out", "run2"], root)
    assert "done: 1 epoch(s)" in p.stdout
    first, again = (json.loads((root / d / "config.json").read_text()) for d in ("run", "run2"))
    assert first.pop("out") == "run" and again.pop("out") == "run2"
    assert again == first  # the same config, augmentation groups and all
    # an override on top of the saved groups changes that group only
    p = run(["-m", "hpa_kernel.train", "--config", "run/config.json", "--out", "run3", "--set", "augment.noise.p=0.25"],
            root)
    third = json.loads((root / "run3" / "config.json").read_text())
    assert third["augment"]["groups"]["noise"]["p"] == 0.25
    third["augment"]["groups"]["noise"]["p"] = first["augment"]["groups"]["noise"]["p"]
    assert third["augment"] == first["augment"]
    (root / "m64.json").write_text('{"image_size": 64}')
    p = run(["-m", "hpa_kernel.train.oof", "--config", "run/config.json", "--checkpoint", "run/last_model.pt",
             "--fold", "0", "--manifest", "m64.json", "--limit", "1", "--out", "oof", "--device", "cpu"], root)
    assert (root / "oof" / "oof_images.csv").is_file() and "1 images of fold 0" in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["--checkpoint", "run/last.pt", "--fold", "0"], "run/last.pt: not a Puzzle-CAM checkpoint"),
    (["--checkpoint", "run/last_model.pt", "--fold", "1", "--config", "nope.json"], "nope.json not found"),
    (["--checkpoint", "run/last_model.pt", "--fold", "7"], "fold 7 has no images"),
    (["--checkpoint", "run/none.pt", "--fold", "0"], "checkpoint file not found"),
])
def test_oof_mistakes_are_one_line(one_epoch, args, needle):
    root, _ = one_epoch
    (root / "m64.json").write_text('{"image_size": 64}')
    base = ["-m", "hpa_kernel.train.oof", "--config", "run/config.json", "--manifest", "m64.json", "--out", "x",
            "--device", "cpu"]
    p = run(base + args, root, code=2)
    errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]


@pytest.fixture(scope="module")
def last_pt_weights(one_epoch) -> Path:
    """A weights folder whose manifest names the run's last.pt (a training state), as a
    user who took the only .pt file a one-epoch run used to leave would make it."""
    import shutil

    from hpa_kernel.integrity import update_manifest

    root, _ = one_epoch
    weights = root / "weights_last"
    weights.mkdir()
    shutil.copy(root / "run" / "last.pt", weights / "last.pt")
    (weights / "manifest.json").write_text(json.dumps({"segmentation": {"method": "classic"},
                                                       "classifiers": [{"path": "last.pt"}]}))
    update_manifest(weights / "manifest.json")
    run(["-m", "hpa_kernel.tools.synthetic", "--out", "test_data", "--images", "2", "--seed", "9001",
         "--sizes", "64"], root)
    return weights


@pytest.mark.slow
def test_submit_stops_at_start_up_when_no_classifier_is_usable(one_epoch, last_pt_weights):
    root, _ = one_epoch
    base = ["-m", "hpa_kernel.submit", "--data-dir", "test_data", "--weights", str(last_pt_weights / "manifest.json"),
            "--device", "cpu", "--no-progress"]
    for extra in ([], ["--parallel", "2"]):
        out = root / f"sub{len(extra)}.csv"
        p = run(base + ["--out", str(out), *extra], root, code=2)
        assert "no usable classifier" in p.stderr and "last.pt" in p.stderr, p.stderr[-2000:]
        assert not out.exists()  # no file of empty rows


def test_kernel_py_passes_the_failure_on(one_epoch, last_pt_weights):
    root, _ = one_epoch
    kernel = Path(__file__).resolve().parent.parent / "submission" / "kernel.py"
    p = run([str(kernel), "--skip-install", "--dataset-dir", str(last_pt_weights), "--weights",
             str(last_pt_weights / "manifest.json"), "--data-dir", "test_data", "--out", "kernel_sub.csv",
             "--", "--device", "cpu", "--no-progress"], root, code=2)
    assert "kernel exit status 2" in p.stderr and "the submission is complete" not in p.stderr
    assert not (root / "kernel_sub.csv").exists()


def test_build_wheel_refuses_the_training_state(one_epoch, last_pt_weights):
    root, _ = one_epoch
    script = Path(__file__).resolve().parent.parent / "build_wheel.sh"
    env = {**ENV, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(script), "--no-wheelhouse", "--weights", str(last_pt_weights), "--out",
                        str(root / "dist")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stderr[-3000:]
    assert "the kernel cannot load classifier" in p.stderr and "last.pt: not a Puzzle-CAM checkpoint" in p.stderr
    assert "use its best.pt or last_model.pt" in p.stderr
    assert not (root / "dist" / "kaggle_dataset").exists()


def _not_a_csv(tmp: Path) -> Path:
    bad = tmp / "bad.csv"
    bad.write_bytes(b"\x00\x01\x02 not a table \xff")
    return bad


@pytest.mark.parametrize("module, args", [
    ("hpa_kernel.train.folds", ["--csv", "{tmp}/none.csv"]),
    ("hpa_kernel.train.sampler", ["--csv", "{bad}", "--out", "{tmp}/w.csv"]),
    ("hpa_kernel.train.prepare", ["--csv", "{bad}", "--src", "{tmp}", "--out", "{tmp}/c"]),
    ("hpa_kernel.train.cells", ["--index", "{bad}", "--truth", "{tmp}/nowhere"]),
    ("hpa_kernel.train.fit_weights", ["--oof", "{tmp}/none", "--manifest", "{bad}"]),
    ("hpa_kernel.train.oof", ["--index-csv", "{bad}", "--checkpoint", "{tmp}/none.pt", "--fold", "0", "--out",
                              "{tmp}/o", "--device", "cpu"]),
    ("hpa_kernel.train.__main__", ["--index-csv", "{bad}", "--set", "pretrained=false", "--out", "{tmp}/run"]),
])
def test_a_users_mistake_in_any_train_command_is_one_line(tmp_path, caplog, module, args):
    """Issue 22 item 4: a missing or malformed input ends in exit 2 and one ERROR line, never a traceback."""
    import importlib

    bad = _not_a_csv(tmp_path)
    argv = [a.format(tmp=tmp_path, bad=bad) for a in args]
    assert importlib.import_module(module).main(argv) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
