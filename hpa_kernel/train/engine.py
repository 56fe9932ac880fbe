"""The training loop: Puzzle-CAM siamese ComboLoss, Adam + ReduceLROnPlateau, checkpoints.

- Adam (``lr``, ``beta1``), ReduceLROnPlateau(``plateau_factor``, ``plateau_patience``)
  stepped on the validation ComboLoss (training loss when there is no validation fold).
- fp16 autocast + GradScaler on CUDA only (``amp``).
- ``OUT/best.pt``: the model with the best validation ComboLoss, written with
  :func:`hpa_kernel.model.save_checkpoint` and the metadata the kernel's loader needs.
- ``OUT/last.pt``: model + optimizer + scheduler + scaler + history, for ``--resume``.
- ``OUT/metrics.csv``: one row per epoch (losses, lr, F1 macro at 0.5, mAP macro);
  ``OUT/config.json``: the resolved config.
- DDP under ``torchrun`` (``WORLD_SIZE > 1``): weighted sampling split between ranks,
  validation sharded and gathered, only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from hpa_kernel.train.augment import RGBYAugment
from hpa_kernel.train.config import TrainConfig
from hpa_kernel.train.dataset import CellCropDataset, RGBYDataset, load_cells, load_index
from hpa_kernel.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    cleanup_distributed,
    wait_for_all,
    init_distributed,
)
from hpa_kernel.train.folds import format_fold_table
from hpa_kernel.train.losses import ComboLoss
from hpa_kernel.train.metrics import macro_f1, macro_map
from hpa_kernel.train.puzzle import PuzzleSiamese
from hpa_kernel.train.sampler import DistributedWeightedSampler, image_weights

__all__ = ["EpochStats", "Trainer", "train"]

logger = logging.getLogger(__name__)
LOSS_PARTS = ("loss", "bce", "bce_re", "l1")


@dataclass
class EpochStats:
    """One row of ``metrics.csv``."""

    epoch: int
    lr: float
    train_loss: float
    train_bce: float
    train_bce_re: float
    train_l1: float
    val_loss: float = math.nan
    val_bce: float = math.nan
    val_bce_re: float = math.nan
    val_l1: float = math.nan
    val_f1: float = math.nan
    val_map: float = math.nan
    val_cell_f1: float = math.nan
    val_cell_map: float = math.nan
    seconds: float = 0.0
    best: bool = False

    def line(self, epochs: int) -> str:
        s = (
            f"epoch {self.epoch + 1}/{epochs} lr {self.lr:.2e} | train {self.train_loss:.4f} "
            f"(bce {self.train_bce:.4f} re {self.train_bce_re:.4f} l1 {self.train_l1:.4f})"
        )
        if not math.isnan(self.val_loss):
            s += f" | val {self.val_loss:.4f} F1 {self.val_f1:.4f} mAP {self.val_map:.4f}"
        if not math.isnan(self.val_cell_map):
            s += f" | cells F1 {self.val_cell_f1:.4f} mAP {self.val_cell_map:.4f}"
        return s + f" | {self.seconds:.0f}s" + (" *best*" if self.best else "")


def _model_meta(cfg: TrainConfig) -> dict[str, Any]:
    from hpa_kernel.stages.model import RGBY_MEAN, RGBY_STD

    return {
        "backbone": cfg.backbone,
        "num_classes": cfg.num_classes,
        "in_chans": 4,
        "image_size": cfg.image_size,
        "crop_size": cfg.crop_size,
        "mean": [float(v) for v in RGBY_MEAN],
        "std": [float(v) for v in RGBY_STD],
    }


class Trainer:
    """Builds data, model and optimiser from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None) -> None:
        from hpa_kernel.stages.model import PuzzleCAM

        self.cfg = cfg.validate()
        self.info = info or DistInfo()
        self.device = torch.device(self.info.device)
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        self.out = Path(cfg.out)
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(int(cfg.threads))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.model = PuzzleCAM(cfg.backbone, num_classes=cfg.num_classes, in_chans=4, pretrained=cfg.pretrained)
        self.model.to(self.device)
        self.meta = _model_meta(cfg)
        net: nn.Module = PuzzleSiamese(self.model, cfg.puzzle_grid)
        if self.info.enabled:
            if cfg.sync_bn and self.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.net = net
        self.loss_fn = ComboLoss(cfg.gamma)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.history: list[EpochStats] = []
        self.best_loss = math.inf
        self.start_epoch = 0
        self._build_data()
        if cfg.resume:
            self.load_state(cfg.resume)

    # ------------------------------------------------------------------ data
    def _build_data(self) -> None:
        cfg, info = self.cfg, self.info
        index = load_index(cfg.index_csv)
        if cfg.fold >= 0:
            if "fold" not in index.columns:
                raise ValueError(f"{cfg.index_csv} has no fold column (run hpa_kernel.train.folds)")
            train_df = index[index["fold"] != cfg.fold].reset_index(drop=True)
            val_df = index[index["fold"] == cfg.fold].reset_index(drop=True)
        else:
            train_df, val_df = index.reset_index(drop=True), index.iloc[:0]
        if len(train_df) == 0:
            raise ValueError(f"no training images (fold {cfg.fold} holds all {len(index)})")
        mean, std = self.meta["mean"], self.meta["std"]
        augment = RGBYAugment(cfg.augment, seed=cfg.seed + 1000 * info.rank)
        images = RGBYDataset(train_df, cfg.image_size, mean, std, augment, patch=cfg.train_patch)
        self.val_set = RGBYDataset(val_df, cfg.image_size, mean, std) if len(val_df) else None
        weights = self._part_weights(images.targets)
        self.train_set: torch.utils.data.Dataset = images
        self.val_cells = None
        n_cells = 0
        if cfg.cells_csv and cfg.cell_fraction > 0:
            cells = load_cells(cfg.cells_csv)
            in_val = cells["ID"].isin(set(val_df["ID"]))
            train_cells = cells[~in_val & cells["ID"].isin(set(train_df["ID"]))].reset_index(drop=True)
            val_cells = cells[in_val].reset_index(drop=True).iloc[: cfg.val_cells_max]
            if len(train_cells):
                n_cells = len(train_cells)
                f = cfg.cell_fraction
                cell_set = CellCropDataset(train_cells, cfg.crop_size, mean, std, augment)
                w_cells = self._part_weights(cell_set.targets)
                weights = np.concatenate([weights * (1 - f) / len(weights), w_cells * f / len(w_cells)])
                self.train_set = ConcatDataset([images, cell_set])
            if len(val_cells):
                self.val_cells = CellCropDataset(val_cells, cfg.crop_size, mean, std)
        n_samples = cfg.samples_per_epoch or len(train_df)
        if cfg.sampler == "weighted" or n_cells:
            self.sampler = DistributedWeightedSampler(weights, n_samples, info.rank, info.world_size, cfg.seed)
        else:
            self.sampler = DistributedSampler(
                self.train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=False
            )
        g = torch.Generator()
        g.manual_seed(cfg.seed + info.rank)
        common = dict(
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.workers > 0,
            worker_init_fn=_seed_worker,
        )
        self.train_loader = DataLoader(self.train_set, sampler=self.sampler, drop_last=False, generator=g, **common)
        self.val_loader = self._shard_loader(self.val_set, common)
        self.val_cell_loader = self._shard_loader(self.val_cells, common)
        if info.is_main:
            if "fold" in index.columns:
                logger.info("%s", format_fold_table(index))
            logger.info(
                "fold %d: %d train / %d val images, %d train cells (%.0f%% of samples) / %d val cells, "
                "%d samples per epoch (%s sampler), world size %d, device %s%s",
                cfg.fold, len(train_df), len(val_df), n_cells, 100 * cfg.cell_fraction * bool(n_cells),
                len(self.val_cells or []), n_samples, cfg.sampler, info.world_size,
                self.device, " (fp16 autocast)" if self.use_amp else "",
            )

    def _part_weights(self, targets: np.ndarray) -> np.ndarray:
        """Class-balancing weights (mean 1) of a dataset's target rows, or ones for the uniform sampler."""
        if self.cfg.sampler != "weighted":
            return np.ones(len(targets))
        return image_weights(targets, self.cfg.sampler_reduce, self.cfg.sampler_clip_class)

    def _shard_loader(self, dataset, common: dict[str, Any]) -> DataLoader | None:
        """This rank's share (every world_size-th item) of a validation set, in order."""
        if dataset is None or len(dataset) == 0:
            return None
        shard = Subset(dataset, list(range(self.info.rank, len(dataset), self.info.world_size)))
        return DataLoader(shard, shuffle=False, **common)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _batches(self, loader: DataLoader, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        limit = self.cfg.max_batches
        total = len(loader) if limit is None else min(len(loader), limit)
        batches = loader if limit is None else itertools.islice(loader, limit)
        for x, y in tqdm(batches, desc=desc, leave=False, disable=not self.info.is_main, total=total):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler; returns the sample-weighted mean of each loss part."""
        self.net.train()
        self.sampler.set_epoch(epoch)
        sums = np.zeros(len(LOSS_PARTS) + 1)
        for x, y in self._batches(self.train_loader, f"train {epoch + 1}"):
            with self._autocast():
                logits, maps, maps_re = self.net(x)
            parts = self.loss_fn(logits, maps, maps_re, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(parts["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = len(x)
            sums += [float(parts[k].detach()) * n for k in LOSS_PARTS] + [n]
        sums = np.asarray(all_reduce_sum(sums.tolist(), self.info))
        return {k: sums[i] / max(sums[-1], 1) for i, k in enumerate(LOSS_PARTS)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """ComboLoss parts, F1 and mAP on the validation fold (gathered over ranks)."""
        if self.val_loader is None:
            return {}
        self.net.eval()
        sums = np.zeros(len(LOSS_PARTS) + 1)
        probs, targets = [], []
        for x, y in self._batches(self.val_loader, "val"):
            with self._autocast():
                logits, maps, maps_re = self.net(x)
            parts = self.loss_fn(logits, maps, maps_re, y)
            sums += [float(parts[k]) * len(x) for k in LOSS_PARTS] + [len(x)]
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(y.cpu().numpy())
        sums = np.asarray(all_reduce_sum(sums.tolist(), self.info))
        p, t = self._gather(probs, targets)
        out = {k: sums[i] / max(sums[-1], 1) for i, k in enumerate(LOSS_PARTS)}
        out["f1"] = macro_f1(p, t, 0.5)
        out["map"] = macro_map(p, t)
        if self.val_cell_loader is not None:
            p, t = self._predict(self.val_cell_loader, "val cells")
            out["cell_f1"] = macro_f1(p, t, 0.5)
            out["cell_map"] = macro_map(p, t)
        return out

    @torch.no_grad()
    def _predict(self, loader: DataLoader, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Sigmoid probabilities and targets over a sharded loader, gathered from all ranks."""
        self.model.eval()
        probs, targets = [], []
        for x, y in self._batches(loader, desc):
            with self._autocast():
                logits = self.model(x)
            probs.append(torch.sigmoid(logits.float()).cpu().numpy())
            targets.append(y.cpu().numpy())
        return self._gather(probs, targets)

    def _gather(self, probs: list[np.ndarray], targets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate this rank's batches (``(0, C)`` float32 when none) and gather all ranks' in rank order."""
        empty = np.zeros((0, self.cfg.num_classes), np.float32)
        p = np.concatenate(probs) if probs else empty
        t = np.concatenate(targets) if targets else empty
        gathered = all_gather_objects((p, t), self.info)
        return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_loss": self.best_loss,
            "history": [asdict(h) for h in self.history],
            "config": self.cfg.to_dict(),
            "meta": self.meta,
        }

    def load_state(self, path: str | Path) -> None:
        """Restore a ``last.pt`` written by :meth:`save_last`; training goes on at the next epoch."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_loss = float(state["best_loss"])
        self.history = [EpochStats(**h) for h in state.get("history", [])]
        if self.info.is_main:
            logger.info("resumed from %s at epoch %d (best loss %.4f)", path, self.start_epoch + 1, self.best_loss)

    def save_last(self, epoch: int) -> None:
        tmp = self.out / "last.pt.tmp"
        torch.save(self.state_dict(epoch), tmp)
        tmp.replace(self.out / "last.pt")

    def save_best(self, stats: EpochStats) -> Path:
        """``best.pt`` through :func:`hpa_kernel.model.save_checkpoint` (fp16 weights if ``save_fp16``)."""
        from hpa_kernel.stages.model import save_checkpoint

        path = self.out / "best.pt"
        extra = {
            "epoch": stats.epoch + 1,
            "val_loss": stats.val_loss,
            "val_f1": stats.val_f1,
            "val_map": stats.val_map,
            "train_loss": stats.train_loss,
            "fold": self.cfg.fold,
            "dtype": "float16" if self.cfg.save_fp16 else "float32",
        }
        save_checkpoint(self.model, path, half=self.cfg.save_fp16, **self.meta, **extra)
        return path

    def _write_metrics(self) -> None:
        pd.DataFrame([asdict(h) for h in self.history]).to_csv(self.out / "metrics.csv", index=False)

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[EpochStats]:
        """Run epochs ``start_epoch .. epochs-1``; returns the whole history."""
        cfg = self.cfg
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            if self._out_of_time(t_start, epoch):
                break
            t0 = time.perf_counter()
            tr = self.train_epoch(epoch)
            va = self.validate()
            monitor = float(va.get("loss", tr["loss"]))
            self.scheduler.step(monitor)
            stats = EpochStats(
                epoch=epoch,
                lr=float(self.optimizer.param_groups[0]["lr"]),
                **{f"train_{k}": float(v) for k, v in tr.items()},
                **{f"val_{k}": float(v) for k, v in va.items()},
            )
            stats.best = bool(monitor < self.best_loss)
            if stats.best:
                self.best_loss = monitor
            stats.seconds = float(time.perf_counter() - t0)
            self.history.append(stats)
            if self.info.is_main:
                if stats.best:
                    self.save_best(stats)
                self.save_last(epoch)
                self._write_metrics()
                logger.info("%s", stats.line(cfg.epochs))
        return self.history

    def _out_of_time(self, t_start: float, epoch: int) -> bool:
        """True when ``time_budget_min`` is set and one more (average) epoch would pass it.

        Every rank takes the decision of rank 0, so they stop together.
        """
        budget = self.cfg.time_budget_min
        done = [h.seconds for h in self.history[-(epoch - self.start_epoch) :]] if epoch > self.start_epoch else []
        if budget is None or not done:
            return False
        elapsed = time.perf_counter() - t_start
        stop = float(self.info.is_main and elapsed + float(np.mean(done)) > 60.0 * budget)
        stop = all_reduce_sum([stop], self.info)[0] > 0
        if stop and self.info.is_main:
            logger.info(
                "time budget of %.1f min reached: stopping after %d epoch(s) (%.1f min elapsed)",
                budget, epoch, elapsed / 60,
            )
        return stop


def _seed_worker(worker_id: int) -> None:
    """Per-worker seeds for numpy and the albumentations pipeline (from torch's worker seed)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    ds = info.dataset if info is not None else None
    ds = getattr(ds, "dataset", ds)  # Subset
    for part in getattr(ds, "datasets", [ds]):  # ConcatDataset
        augment = getattr(part, "augment", None)
        if augment is not None and hasattr(augment, "reseed"):
            augment.reseed(seed)


def train(cfg: TrainConfig) -> list[EpochStats]:
    """Run one training (single process or one rank of a ``torchrun`` job)."""
    info = init_distributed(cfg.device)
    try:
        stats = Trainer(cfg, info).fit()
        wait_for_all(info)
        return stats
    finally:
        cleanup_distributed()
