"""The training loop on a handful of tiny synthetic images (timm's test_resnet)."""

import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from hpa_kernel.stages.model import load_checkpoint
from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.cells import build_cell_table
from hpa_kernel.train.config import TrainConfig
from hpa_kernel.train.engine import Trainer, default_workers
from hpa_kernel.train.prepare import prepare_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_dataset(root / "data", 12, seed=1002, sizes=96, depth=8, split="train", progress=False)
    s = prepare_cache(root / "data" / "train.csv", [root / "data" / "train"], root / "cache", size=128,
                      workers=1, n_folds=4, progress=False)
    # synthetic per-cell truth: for evaluation only (val_cells_csv)
    build_cell_table(s.index_path, truth=root / "data" / "truth", max_per_image=3, min_area=4, progress=False)
    return root / "cache"


def _cfg(cache, tmp_path, **kw) -> TrainConfig:
    base = dict(index_csv=str(cache / "index.csv"), backbone="test_resnet", pretrained=False, image_size=64,
                train_crop=None, crop_size=64, epochs=2, batch_size=4, workers=0, out=str(tmp_path / "run"), seed=0,
                threads=1, plateau_patience=1, best_from_epoch=1, augment="none")
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_fit_writes_metrics_best_and_last(cache, tmp_path):
    cfg = _cfg(cache, tmp_path)
    history = Trainer(cfg).fit()
    assert [h.epoch for h in history] == [0, 1]
    assert all(math.isfinite(h.train_loss) and math.isfinite(h.val_loss) for h in history)
    assert all(0.0 <= h.val_map <= 1.0 and 0.0 <= h.val_f1 <= 1.0 for h in history)
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert len(metrics) == 2 and {"train_loss", "val_loss", "val_f1", "val_map", "lr", "skipped"} <= set(metrics.columns)
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["backbone"] == "test_resnet" and meta["image_size"] == 64 and meta["crop_size"] == 64
    assert len(meta["mean"]) == 4 and meta["epoch"] in (1, 2) and meta["fold"] == 0
    best = [h for h in history if h.best][-1]
    assert meta["val_loss"] == pytest.approx(best.val_loss)
    with torch.no_grad():
        logits = model(torch.zeros(1, 4, 64, 64))
    assert logits.shape == (1, 19)
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "config.json").exists()


def test_best_is_kept_from_best_from_epoch_on(cache, tmp_path):
    history = Trainer(_cfg(cache, tmp_path, best_from_epoch=2, max_batches=1)).fit()
    assert history[0].best is False  # epoch 1 never counts, however good
    assert history[1].best is True
    assert load_checkpoint(tmp_path / "run" / "best.pt")[1]["epoch"] == 2


def test_scheduler_is_the_recipe_plateau(cache, tmp_path):
    t = Trainer(_cfg(cache, tmp_path, plateau_factor=0.3, plateau_patience=8, min_lr=1e-6))
    s = t.scheduler
    assert isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (s.factor, s.patience, s.min_lrs, s.mode) == (0.3, 8, [1e-6], "min")
    assert isinstance(t.optimizer, torch.optim.Adam) and t.optimizer.defaults["betas"][0] == 0.9


def test_resume_continues_where_it_stopped(cache, tmp_path):
    Trainer(_cfg(cache, tmp_path, epochs=1)).fit()
    t = Trainer(_cfg(cache, tmp_path, epochs=2, resume=str(tmp_path / "run" / "last.pt")))
    assert t.start_epoch == 1 and len(t.history) == 1
    history = t.fit()
    assert [h.epoch for h in history] == [0, 1]
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 2


def test_init_from_starts_a_new_stage(cache, tmp_path):
    Trainer(_cfg(cache, tmp_path / "a", epochs=1, max_batches=1)).fit()
    best = tmp_path / "a" / "run" / "best.pt"
    t = Trainer(_cfg(cache, tmp_path / "b", epochs=1, init_from=str(best), lr=1e-4))
    assert t.start_epoch == 0 and t.history == [] and t.optimizer.param_groups[0]["lr"] == 1e-4
    want, _ = load_checkpoint(best)
    for k, v in want.state_dict().items():
        assert torch.equal(t.model.state_dict()[k], v), k
    assert str(best) in t.source


def test_val_cells_are_evaluated_never_trained_on(cache, tmp_path):
    cfg = _cfg(cache, tmp_path, image_size=128, train_crop=64, epochs=1, save_fp16=True, max_batches=2,
               val_cells_csv=str(cache / "cells.csv"))
    t = Trainer(cfg)
    x, y, skipped = next(iter(t.train_loader))
    assert x.shape == (4, 64, 64, 4) and x.dtype == torch.uint8 and y.shape == (4, 19) and skipped == []
    val_ids = set(pd.read_csv(cache / "index.csv").query("fold == 0")["ID"])
    cells = pd.read_csv(cache / "cells.csv")
    assert len(t.val_cells) == min(len(cells[cells["ID"].isin(val_ids)]), cfg.val_cells_max)
    assert len(t.train_set) == 9  # images only: the cells add no training sample
    (h,) = t.fit()
    assert math.isfinite(h.val_cell_map)
    sd = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["image_size"] == 128 and meta["train_crop"] == 64 and next(model.parameters()).dtype == torch.float32


def test_unreadable_sample_is_skipped_counted_and_reported(cache, tmp_path, caplog):
    import shutil

    bad_cache = tmp_path / "cache"
    shutil.copytree(cache, bad_cache)
    index = pd.read_csv(bad_cache / "index.csv")
    victim = index[index["fold"] != 0].iloc[0]
    (bad_cache / victim["path"]).write_bytes(b"not an npy")
    cfg = _cfg(bad_cache, tmp_path, epochs=1, sampler="uniform")  # every training image once
    with caplog.at_level(logging.WARNING, logger="hpa_kernel.train.engine"):
        (h,) = Trainer(cfg).fit()
    assert h.skipped == 1 and math.isfinite(h.train_loss)
    assert any("1 sample(s) skipped" in r.message and victim["ID"] in r.message for r in caplog.records)
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["skipped"].tolist() == [1]


def test_training_is_deterministic(cache, tmp_path):
    a = Trainer(_cfg(cache, tmp_path / "a", epochs=1, max_batches=2, augment=None)).fit()[0]
    b = Trainer(_cfg(cache, tmp_path / "b", epochs=1, max_batches=2, augment=None)).fit()[0]
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


def test_cell_table(cache):
    cells = pd.read_csv(cache / "cells.csv")
    assert list(cells.columns) == ["ID", "cell_id", "Label", "path", "mask", "fold"]
    assert cells.groupby("ID").size().max() <= 3
    m = np.load(cache / cells["mask"][0])
    assert m.shape == (128, 128) and m.dtype == np.uint16 and cells["cell_id"][0] in m


def test_time_budget_stops_early(cache, tmp_path):
    history = Trainer(_cfg(cache, tmp_path, epochs=5, max_batches=1, time_budget_min=1e-6)).fit()
    assert len(history) == 1  # the first epoch always runs, then the budget is spent
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 1


def test_default_workers_from_the_cpu_count():
    import os

    cpus = len(os.sched_getaffinity(0))
    assert default_workers(1) == max(1, min(16, cpus - 1))
    assert default_workers(64) == 1
