"""DistributedDataParallel on CPU: torchrun with 2 gloo processes, 1 tiny epoch."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.prepare import prepare_cache


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    import torch.distributed as dist

    # gloo ships with every CPU build of torch we support: its absence is a failure, not a skip
    assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is required"
    write_dataset(tmp_path / "data", 12, seed=1004, sizes=64, depth=8, split="train", progress=False)
    s = prepare_cache(tmp_path / "data" / "train.csv", [tmp_path / "data" / "train"], tmp_path / "cache",
                      size=64, workers=1, n_folds=4, progress=False)
    cfg = {"index_csv": str(s.index_path), "backbone": "test_resnet", "pretrained": False, "image_size": 64,
           "train_crop": None, "crop_size": 64, "epochs": 1, "best_from_epoch": 1, "batch_size": 2, "workers": 0,
           "threads": 1, "device": "cpu", "out": str(tmp_path / "run")}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hpa_kernel.train", "--config", str(tmp_path / "cfg.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0/2 joined the gloo process group" in p.stderr
    assert "world size 2" in p.stderr and "2 per rank x 2 rank(s) = global batch 4" in p.stderr
    assert p.stdout.count("done: 1 epoch(s)") == 1  # only rank 0 reports and writes
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics) == 1 and metrics["val_loss"].notna().all()
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()
