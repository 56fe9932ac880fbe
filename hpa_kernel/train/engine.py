"""The training loop: Puzzle-CAM siamese ComboLoss, Adam + ReduceLROnPlateau, checkpoints.

- Every training sample is a random ``train_crop`` square (384 of 512) of its cached
  image, augmented by the config's groups; validation sees the whole ``image_size`` image.
- Adam (``lr``, ``beta1``), ReduceLROnPlateau(``plateau_factor``, ``plateau_patience``,
  ``min_lr``) stepped once per epoch on the validation ComboLoss (the training loss when
  there is no validation fold).
- fp16 autocast + GradScaler on CUDA only (``amp``); ``cudnn.benchmark`` on CUDA.
- Input: the loader ships uint8 pixels; :func:`~hpa_kernel.train.dataset.to_model_input`
  scales and normalises them on the device. Loss parts are summed on the device and read
  back every ``log_every`` steps (the progress bar's running loss) and at the epoch's end.
- A sample that cannot be read or augmented is skipped and counted; the epoch's log line
  says how many and which.
- ``OUT/best.pt``: the model with the best validation ComboLoss from epoch
  ``best_from_epoch`` on, written with :func:`hpa_kernel.stages.model.save_checkpoint` and the
  metadata the kernel's loader needs.
- ``OUT/last_model.pt``: the latest epoch's model, written every epoch like ``best.pt``
  (a kernel checkpoint), so even a run too short for a ``best.pt`` leaves one the kernel loads.
- ``OUT/last.pt``: model + optimizer + scheduler + scaler + history, for ``resume``
  (the same stage; the kernel refuses it); ``init_from`` starts a new stage from any
  earlier checkpoint's weights.
- ``OUT/metrics.csv``: one row per epoch, counted from 1 as in the log (losses, lr, F1 macro
  at 0.5, mAP macro, skipped), and ``OUT/training.png`` beside it (loss, F1, mAP per epoch;
  needs matplotlib); ``OUT/config.json``: the resolved config, which ``--config`` loads back.
- Each epoch's log line ends with the ETA of the whole run; at the end the per-class AP
  of the validation fold (image level) of the model for a manifest (``best.pt``'s epoch,
  else the last) is logged and written to ``OUT/val_class_ap.csv``.
- DDP under ``torchrun`` (``WORLD_SIZE > 1``): ``batch_size`` is per rank (global batch =
  ``batch_size x world size``), weighted sampling split between ranks, validation sharded
  and gathered, only rank 0 writes. The lr is not scaled for you: the recipe's 3e-4 is for
  a global batch of 36 (scale it linearly, ``lr x global / 36``, if you change the global
  batch). Resuming a multi-node run needs ``out`` on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from hpa_kernel.train.augment import RGBYAugment
from hpa_kernel.train.config import TrainConfig
from hpa_kernel.train.dataset import (
    CellCropDataset,
    RGBYDataset,
    Skipped,
    collate_skipping,
    load_cells,
    load_index,
    to_model_input,
)
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
from hpa_kernel.train.pretrained import build_model, load_stage_weights
from hpa_kernel.train.puzzle import PuzzleSiamese
from hpa_kernel.train.report import CLASS_AP_NAME, PLOT_NAME, class_ap_table, eta_text, format_class_ap, plot_history
from hpa_kernel.train.sampler import DistributedWeightedSampler, image_weights

__all__ = ["EpochStats", "Trainer", "default_workers", "run_summary", "train"]

logger = logging.getLogger(__name__)
LOSS_PARTS = ("loss", "bce", "bce_re", "l1")
BEST_NAME = "best.pt"  # kernel checkpoint: the best validation ComboLoss from best_from_epoch on
LAST_MODEL_NAME = "last_model.pt"  # kernel checkpoint: the latest epoch's weights
LAST_STATE_NAME = "last.pt"  # training state for --resume (not a kernel checkpoint)


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
    skipped: int = 0
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
        if self.skipped:
            s += f" | {self.skipped} sample(s) skipped"
        return s + f" | {self.seconds:.0f}s" + (" *best*" if self.best else "")


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers per rank from the CPU count: the cores this process may use,
    shared between the ranks of this node, one left for the training process (>= 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(1, min(16, cpus // max(local, 1) - 1))


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
        self.cfg = cfg.validate()
        cfg.check_files()
        self.info = info or DistInfo()
        self.device = torch.device(self.info.device)
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        self.out = Path(cfg.out)
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(int(cfg.threads))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.augment = RGBYAugment(cfg.augment, seed=cfg.seed + 1000 * self.info.rank)  # bad params fail here

        if cfg.init_from:
            self.model, _ = build_model(cfg.backbone, cfg.num_classes, None)
            self.source = load_stage_weights(self.model, cfg.init_from)
        else:
            self.model, self.source = build_model(cfg.backbone, cfg.num_classes,
                                                  cfg.pretrained_file if cfg.pretrained else None)
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
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.history: list[EpochStats] = []
        self._val_best = self._val_last = self._val_preds = None  # (epoch, probs, targets) of the val fold
        self.best_loss = math.inf
        self.start_epoch = 0
        self.workers = cfg.workers if cfg.workers is not None else default_workers(self.info.world_size)
        self._log_start()
        self._build_data()
        if cfg.resume:
            self.load_state(cfg.resume)

    def _log_start(self) -> None:
        """The first lines of the log: what is being trained, and how."""
        cfg, info = self.cfg, self.info
        if not info.is_main:
            return
        logger.info("backbone: timm %s, %d classes, RGBY input %d px, training crops %s",
                    cfg.backbone, cfg.num_classes, cfg.image_size,
                    f"{cfg.train_crop} px (random)" if cfg.train_crop and cfg.train_crop < cfg.image_size else "none")
        logger.info("start: %s", self.source)
        logger.info("batch: %d per rank x %d rank(s) = global batch %d; lr %.2e; %s",
                    cfg.batch_size, info.world_size, cfg.batch_size * info.world_size, cfg.lr,
                    f"fp16 autocast on {self.device}" if self.use_amp else f"float32 on {self.device}")
        logger.info("augmentation groups: %s", cfg.augment.describe())
        logger.info("loss: ComboLoss gamma %g, puzzle grid %d; Adam betas (%g, %g); ReduceLROnPlateau(%g, "
                    "patience %d, min_lr %g) on the val ComboLoss; best kept from epoch %d",
                    cfg.gamma, cfg.puzzle_grid, cfg.beta1, cfg.beta2, cfg.plateau_factor, cfg.plateau_patience,
                    cfg.min_lr, cfg.best_from_epoch)
        logger.info("loader: %d worker(s) per rank%s", self.workers,
                    " (from the CPU count)" if cfg.workers is None else "")
        defaults = cfg.defaults_used()
        if defaults:
            logger.info("config defaults used: %s", ", ".join(f"{k}={v!r}" for k, v in defaults.items()))

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
        self.train_set = RGBYDataset(train_df, cfg.image_size, self.augment, crop=cfg.train_crop)
        self.val_set = RGBYDataset(val_df, cfg.image_size) if len(val_df) else None
        self.val_cells = None
        if cfg.val_cells_csv and len(val_df):  # evaluation only: never a training sample
            cells = load_cells(cfg.val_cells_csv)
            cells = cells[cells["ID"].isin(set(val_df["ID"]))].reset_index(drop=True).iloc[: cfg.val_cells_max]
            self.val_cells = CellCropDataset(cells, cfg.crop_size) if len(cells) else None
        n_samples = cfg.samples_per_epoch or len(train_df)
        if cfg.sampler == "weighted":
            weights = image_weights(self.train_set.targets, cfg.sampler_clip_rank)
            self.sampler = DistributedWeightedSampler(weights, n_samples, info.rank, info.world_size, cfg.seed)
        else:
            self.sampler = DistributedSampler(
                self.train_set, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=False
            )
        g = torch.Generator()
        g.manual_seed(cfg.seed + info.rank)
        common = dict(
            batch_size=cfg.batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0,
            worker_init_fn=_seed_worker,
            collate_fn=collate_skipping,
        )
        self.train_loader = DataLoader(self.train_set, sampler=self.sampler, drop_last=False, generator=g, **common)
        self.val_loader = self._shard_loader(self.val_set, common)
        self.val_cell_loader = self._shard_loader(self.val_cells, common)
        if info.is_main:
            if "fold" in index.columns:
                logger.info("%s", format_fold_table(index))
            logger.info(
                "fold %d: %d train / %d val images%s, %d samples per epoch (%s sampler), world size %d",
                cfg.fold, len(train_df), len(val_df),
                f", {len(self.val_cells)} val cells (evaluation only)" if self.val_cells else "",
                n_samples, cfg.sampler, info.world_size,
            )

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

    def _batches(self, loader: DataLoader, desc: str, skipped: list[Skipped]):
        """``(bar, iterator of (x, y))`` on the device; skipped samples are appended to ``skipped``."""
        limit = self.cfg.max_batches
        total = len(loader) if limit is None else min(len(loader), limit)
        batches = loader if limit is None else itertools.islice(loader, limit)
        bar = tqdm(batches, desc=desc, leave=False, disable=not self.info.is_main, total=total)

        def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y, bad in bar:
                skipped.extend(bad)
                if x is None:
                    continue
                x = to_model_input(x.to(self.device, non_blocking=True), self.meta["mean"], self.meta["std"])
                yield x, y.to(self.device, non_blocking=True)

        return bar, gen()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler; returns the sample-weighted mean of each loss part
        and ``skipped`` (samples that could not be read or augmented, over all ranks)."""
        self.net.train()
        self.sampler.set_epoch(epoch)
        sums = torch.zeros(len(LOSS_PARTS) + 1, dtype=torch.float64, device=self.device)
        skipped: list[Skipped] = []
        bar, batches = self._batches(self.train_loader, f"train {epoch + 1}", skipped)
        for step, (x, y) in enumerate(batches, 1):
            with self._autocast():
                logits, maps, maps_re = self.net(x)
            parts = self.loss_fn(logits, maps, maps_re, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(parts["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = len(x)
            sums += torch.stack([parts[k].detach().double() * n for k in LOSS_PARTS]
                                + [torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            if step % self.cfg.log_every == 0 and self.info.is_main:
                bar.set_postfix(loss=f"{float(sums[0] / sums[-1]):.4f}")  # one host sync every log_every steps
        self._report_skipped(epoch, skipped)
        totals = all_reduce_sum(sums.tolist() + [len(skipped)], self.info)
        out = {k: totals[i] / max(totals[len(LOSS_PARTS)], 1) for i, k in enumerate(LOSS_PARTS)}
        out["skipped"] = int(totals[-1])
        return out

    def _report_skipped(self, epoch: int, skipped: list[Skipped]) -> None:
        if skipped:
            shown = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            logger.warning("epoch %d, rank %d: %d sample(s) skipped: %s%s",
                           epoch + 1, self.info.rank, len(skipped), shown, more)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """ComboLoss parts, F1 and mAP on the validation fold (gathered over ranks)."""
        if self.val_loader is None:
            return {}
        self.net.eval()
        sums = torch.zeros(len(LOSS_PARTS) + 1, dtype=torch.float64, device=self.device)
        probs, targets, skipped = [], [], []
        _, batches = self._batches(self.val_loader, "val", skipped)
        for x, y in batches:
            with self._autocast():
                logits, maps, maps_re = self.net(x)
            parts = self.loss_fn(logits, maps, maps_re, y)
            sums += torch.stack([parts[k].double() * len(x) for k in LOSS_PARTS]
                                + [torch.tensor(float(len(x)), dtype=torch.float64, device=self.device)])
            probs.append(torch.sigmoid(logits.float()))
            targets.append(y)
        if skipped:
            logger.warning("validation, rank %d: %d image(s) skipped: %s", self.info.rank, len(skipped),
                           "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5]))
        totals = all_reduce_sum(sums.tolist(), self.info)
        p, t = self._gather(probs, targets)
        out = {k: totals[i] / max(totals[-1], 1) for i, k in enumerate(LOSS_PARTS)}
        out["f1"] = macro_f1(p, t, 0.5)
        out["map"] = macro_map(p, t)
        self._val_preds = (p, t)
        if self.val_cell_loader is not None:
            p, t = self._predict(self.val_cell_loader, "val cells")
            out["cell_f1"] = macro_f1(p, t, 0.5)
            out["cell_map"] = macro_map(p, t)
        return out

    @torch.no_grad()
    def _predict(self, loader: DataLoader, desc: str) -> tuple[np.ndarray, np.ndarray]:
        """Sigmoid probabilities and targets over a sharded loader, gathered from all ranks."""
        self.model.eval()
        probs, targets, skipped = [], [], []
        _, batches = self._batches(loader, desc, skipped)
        for x, y in batches:
            with self._autocast():
                logits = self.model(x)
            probs.append(torch.sigmoid(logits.float()))
            targets.append(y)
        return self._gather(probs, targets)

    def _gather(self, probs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate this rank's batches (``(0, C)`` float32 when none) and gather all ranks' in rank order."""
        empty = np.zeros((0, self.cfg.num_classes), np.float32)
        p = torch.cat(probs).cpu().numpy() if probs else empty
        t = torch.cat(targets).cpu().numpy() if targets else empty
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
        tmp = self.out / (LAST_STATE_NAME + ".tmp")
        torch.save(self.state_dict(epoch), tmp)
        tmp.replace(self.out / LAST_STATE_NAME)

    def save_best(self, stats: EpochStats) -> Path:
        """``best.pt`` through :func:`hpa_kernel.stages.model.save_checkpoint` (fp16 weights if ``save_fp16``)."""
        return self.save_model(stats, self.out / BEST_NAME)

    def save_model(self, stats: EpochStats, path: Path) -> Path:
        """A kernel checkpoint of the current weights (:func:`hpa_kernel.stages.model.save_checkpoint`)."""
        from hpa_kernel.stages.model import save_checkpoint

        extra = {
            "epoch": stats.epoch + 1,
            "val_loss": stats.val_loss,
            "val_f1": stats.val_f1,
            "val_map": stats.val_map,
            "train_loss": stats.train_loss,
            "fold": self.cfg.fold,
            "dtype": "float16" if self.cfg.save_fp16 else "float32",
            "trained_from": self.source,
            "train_crop": self.cfg.train_crop,
        }
        return save_checkpoint(self.model, path, half=self.cfg.save_fp16, **self.meta, **extra)  # atomic

    def _write_metrics(self) -> None:
        """``metrics.csv`` (epochs counted from 1, as the log) and ``training.png`` beside it."""
        table = pd.DataFrame([asdict(h) for h in self.history])
        table["epoch"] += 1
        table.to_csv(self.out / "metrics.csv", index=False)
        plot_history(table, self.out / PLOT_NAME)

    def _report_class_ap(self) -> None:
        """Per-class image-level AP of the validation fold, for the model a manifest should
        name (best.pt's epoch, else the last), in the log and in ``val_class_ap.csv``."""
        val = self._val_best or self._val_last
        if val is None:
            return
        epoch, probs, targets = val
        table = class_ap_table(probs, targets, epoch + 1)
        table.to_csv(self.out / CLASS_AP_NAME, index=False, float_format="%.6g")
        which = "best.pt" if val is self._val_best else "the last epoch"
        logger.info("validation fold, image level, per-class AP of %s (epoch %d) -> %s\n%s", which, epoch + 1,
                    self.out / CLASS_AP_NAME, format_class_ap(table))

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[EpochStats]:
        """Run epochs ``start_epoch .. epochs-1``; returns the whole history."""
        cfg = self.cfg
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        t_start = time.perf_counter()
        self._val_best = self._val_last = self._val_preds = None
        for epoch in range(self.start_epoch, cfg.epochs):
            if self._out_of_time(t_start, epoch):
                break
            t0 = time.perf_counter()
            tr = self.train_epoch(epoch)
            skipped = int(tr.pop("skipped"))
            va = self.validate()
            monitor = float(va.get("loss", tr["loss"]))
            self.scheduler.step(monitor)
            stats = EpochStats(
                epoch=epoch,
                lr=float(self.optimizer.param_groups[0]["lr"]),
                **{f"train_{k}": float(v) for k, v in tr.items()},
                **{f"val_{k}": float(v) for k, v in va.items()},
                skipped=skipped,
            )
            stats.best = bool(epoch + 1 >= cfg.best_from_epoch and monitor < self.best_loss)
            if stats.best:
                self.best_loss = monitor
            stats.seconds = float(time.perf_counter() - t0)
            self.history.append(stats)
            if self._val_preds is not None:
                self._val_last = (epoch, *self._val_preds)
                self._val_best = self._val_last if stats.best else self._val_best
            if self.info.is_main:
                if stats.best:
                    self.save_best(stats)
                self.save_model(stats, self.out / LAST_MODEL_NAME)
                self.save_last(epoch)
                self._write_metrics()
                session = [h.seconds for h in self.history[-(epoch + 1 - self.start_epoch):]]
                logger.info("%s | %s", stats.line(cfg.epochs), eta_text(session, cfg.epochs - epoch - 1))
        if self.info.is_main:
            self._report_class_ap()
        if self.info.is_main and not any(h.best for h in self.history):
            logger.warning("no best.pt written: best is kept from epoch %d on and the run stopped before it",
                           cfg.best_from_epoch)
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
    """In each DataLoader worker: no OpenCV thread pool (the workers are the parallelism),
    per-worker seeds for numpy and the albumentations pipeline (from torch's worker seed)."""
    import cv2

    cv2.setNumThreads(0)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    ds = info.dataset if info is not None else None
    ds = getattr(ds, "dataset", ds)  # Subset
    augment = getattr(ds, "augment", None)
    if augment is not None and hasattr(augment, "reseed"):
        augment.reseed(seed)


def run_summary(cfg: TrainConfig, history: list[EpochStats]) -> str:
    """The last line of a run: which files exist in ``cfg.out`` and which one goes in a manifest."""
    out = Path(cfg.out)
    best = [h for h in history if h.best][-1:]
    parts = [f"done: {len(history)} epoch(s) in {out}"]
    files = []
    if best and (out / BEST_NAME).is_file():
        files.append(f"{BEST_NAME} (best val loss, {best[0].line(cfg.epochs)})")
    else:
        files.append(f"no {BEST_NAME} (the best is kept from epoch {cfg.best_from_epoch} on)")
    if (out / LAST_MODEL_NAME).is_file() and history:
        files.append(f"{LAST_MODEL_NAME} (epoch {history[-1].epoch + 1} weights)")
    if (out / LAST_STATE_NAME).is_file():
        files.append(f"{LAST_STATE_NAME} (training state for --resume; the kernel cannot load it)")
    parts.append("files: " + ", ".join(files))
    pick = BEST_NAME if best and (out / BEST_NAME).is_file() else LAST_MODEL_NAME
    if (out / pick).is_file():
        parts.append(f"for a manifest: {out / pick}")
    else:
        parts.append("no kernel checkpoint was written")
    return "; ".join(parts)


def train(cfg: TrainConfig) -> list[EpochStats]:
    """Run one training (single process or one rank of a ``torchrun`` job)."""
    info = init_distributed(cfg.device)
    try:
        stats = Trainer(cfg, info).fit()
        wait_for_all(info)
        return stats
    finally:
        cleanup_distributed()
