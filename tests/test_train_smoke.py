"""End to end from the command line: synthetic images -> prepare -> 2 epochs -> checkpoint -> predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


REPO = Path(__file__).resolve().parent.parent


def _run(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_cli_train_two_epochs_then_load_and_predict(tmp_path):
    _run(["-m", "hpa_kernel.tools.synthetic", "--out", str(tmp_path / "data"), "--images", "32", "--seed", "1003",
          "--sizes", "64,96,128", "--depth", "mixed", "--split", "train"], tmp_path)
    p = _run(["-m", "hpa_kernel.train.prepare", "--csv", str(tmp_path / "data" / "train.csv"), "--src",
              str(tmp_path / "data" / "train"), "--out", str(tmp_path / "cache"), "--size", "64", "--workers", "1"],
             tmp_path)
    assert "32 image(s) cached" in p.stdout and "class counts per fold" in p.stdout
    cfg = {"index_csv": str(tmp_path / "cache" / "index.csv"), "backbone": "test_resnet", "pretrained": False,
           "image_size": 64, "train_crop": None, "crop_size": 64, "epochs": 5, "batch_size": 8, "workers": 0,
           "threads": 1, "out": str(tmp_path / "run")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    p = _run(["-m", "hpa_kernel.train", "--config", str(tmp_path / "cfg.json"), "--epochs", "2"], tmp_path)
    assert "done: 2 epoch(s)" in p.stdout
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 2

    from hpa_kernel.formats.images import read_rgby, resize_rgby
    from hpa_kernel.stages.model import load_checkpoint, normalize

    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["backbone"] == "test_resnet" and meta["image_size"] == 64
    iid = pd.read_csv(tmp_path / "data" / "train.csv")["ID"][0]
    img = resize_rgby(read_rgby(tmp_path / "data" / "train", iid), meta["image_size"])
    x = normalize(torch.from_numpy(img.transpose(2, 0, 1))[None], meta["mean"], meta["std"])
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
    probs = torch.sigmoid(logits)[0].numpy()
    assert probs.shape == (19,) and np.isfinite(probs).all()
    assert model.cams(maps).shape[:2] == (1, 19)

    # a bad override is a clear error, not a traceback
    bad = subprocess.run([sys.executable, "-m", "hpa_kernel.train", "--config", str(tmp_path / "cfg.json"),
                          "--set", "epoch=3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key" in bad.stderr

    # missing index / resume / pretrained files: one line, exit 2, before any training
    for args, needle in [(["--index-csv", str(tmp_path / "none.csv")], "index_csv: file"),
                         (["--resume", str(tmp_path / "none.pt")], "resume: file"),
                         (["--set", "pretrained=true"], "pretrained_file: pretrained is true but no file is set"),
                         (["--config", str(tmp_path / "none.json")], "not found")]:
        cmd = [sys.executable, "-m", "hpa_kernel.train", "--config", str(tmp_path / "cfg.json"), *args]
        p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        errors = [ln for ln in p.stderr.splitlines() if "ERROR" in ln]
        assert p.returncode == 2 and len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
