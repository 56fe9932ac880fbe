"""Training configuration: a dataclass loaded from JSON or YAML, with CLI overrides.

Example (``configs/demo.json``)::

    {"index_csv": "runs/demo_cache/index.csv", "backbone": "resnet10t",
     "image_size": 256, "epochs": 12, "batch_size": 16, "out": "runs/demo"}

Unknown keys are refused (a typo must not silently fall back to a default).
Relative paths in a config file are taken relative to the current directory, the
way the command line would take them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AugmentConfig", "TrainConfig", "TrainConfigError", "load_train_config", "parse_override"]


class TrainConfigError(ValueError):
    """The training config is malformed (unknown key, bad value, unreadable file)."""


@dataclass
class AugmentConfig:
    """Probabilities of the training augmentations (see :mod:`hpa_kernel.train.augment`).

    ``level`` picks a preset: ``"none"`` (no augmentation), ``"light"`` (flips and
    rotations only) or ``"full"`` (the write-up's list, each with probability ``p``).
    """

    level: str = "full"
    p: float = 0.25
    flip_p: float = 0.5


@dataclass
class TrainConfig:
    """Everything one training run needs; ``python -m hpa_kernel.train --config``."""

    # data
    index_csv: str = "cache/index.csv"
    fold: int = 0  # validation fold; the others train. -1 = train on all, validate on none
    n_folds: int = 4
    cells_csv: str | None = None  # optional cell-crop table (see hpa_kernel.train.cells)
    cell_fraction: float = 0.0  # share of training samples drawn as Step-2 cell crops
    val_cells_max: int = 512  # validation cell crops scored per epoch (first N of the fold)
    train_patch: int | None = None  # train on random patches of this side (None = whole image)
    # model
    backbone: str = "resnet10t"
    pretrained: bool = False
    num_classes: int = 19
    image_size: int = 256
    crop_size: int = 128
    # optimisation
    epochs: int = 48
    batch_size: int = 32
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    plateau_factor: float = 0.3
    plateau_patience: int = 8
    gamma: float = 0.25  # weight of L1(F, F_re) in the ComboLoss
    puzzle_grid: int = 2
    amp: bool = True  # fp16 autocast + GradScaler, used on CUDA only
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    # sampling
    sampler: str = "weighted"  # "weighted" or "uniform"
    sampler_reduce: str = "max"  # how an image's class weights combine: "max" or "mean"
    sampler_clip_class: int | None = 8
    samples_per_epoch: int | None = None  # None = number of training images
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # runtime
    workers: int = 2
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int | None = None  # torch.set_num_threads on CPU (None = leave)
    out: str = "runs/train"
    resume: str | None = None
    save_fp16: bool = False  # store best.pt weights as fp16 (shipping size)
    max_batches: int | None = None  # cap batches per epoch (smoke tests)
    time_budget_min: float | None = None  # stop before an epoch that would end past this many minutes

    def validate(self) -> "TrainConfig":
        """Check value ranges; returns ``self`` so calls chain."""
        if self.image_size % (32 * self.puzzle_grid):
            raise TrainConfigError(
                f"image_size {self.image_size} must be a multiple of {32 * self.puzzle_grid} "
                f"(stride 32 x puzzle grid {self.puzzle_grid}) so tile maps stitch exactly"
            )
        if self.crop_size % (32 * self.puzzle_grid):
            raise TrainConfigError(f"crop_size {self.crop_size} must be a multiple of {32 * self.puzzle_grid}")
        side = self.train_patch or self.image_size
        if side % (32 * self.puzzle_grid) or side > self.image_size:
            raise TrainConfigError(f"train_patch {side} must be <= image_size and a multiple of {32 * self.puzzle_grid}")
        if not 0.0 <= self.cell_fraction < 1.0:
            raise TrainConfigError(f"cell_fraction must be in [0, 1), not {self.cell_fraction}")
        if self.cell_fraction > 0:
            if not self.cells_csv:
                raise TrainConfigError("cell_fraction > 0 needs cells_csv")
            if side != self.crop_size:
                raise TrainConfigError(
                    f"cell crops ({self.crop_size}) and image samples ({side}) share batches: "
                    "set train_patch (or image_size) equal to crop_size"
                )
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainConfigError("epochs and batch_size must be >= 1")
        if self.sampler not in ("weighted", "uniform"):
            raise TrainConfigError(f"sampler must be 'weighted' or 'uniform', not {self.sampler!r}")
        if self.sampler_reduce not in ("max", "mean"):
            raise TrainConfigError(f"sampler_reduce must be 'max' or 'mean', not {self.sampler_reduce!r}")
        if self.augment.level not in ("none", "light", "full"):
            raise TrainConfigError(f"augment.level must be none/light/full, not {self.augment.level!r}")
        if not -1 <= self.fold < self.n_folds:
            raise TrainConfigError(f"fold {self.fold} outside -1..{self.n_folds - 1}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device must be auto/cpu/cuda, not {self.device!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        raw = dict(raw)
        aug = raw.pop("augment", {}) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainConfigError(f"unknown config key(s): {', '.join(unknown)}")
        aug_known = {f.name for f in dataclasses.fields(AugmentConfig)}
        aug_unknown = sorted(set(aug) - aug_known)
        if aug_unknown:
            raise TrainConfigError(f"unknown augment key(s): {', '.join(aug_unknown)}")
        return cls(augment=AugmentConfig(**aug), **raw).validate()


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise TrainConfigError(f"config {path} not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a train extra
            raise TrainConfigError("YAML config needs pyyaml (pip install pyyaml) or use JSON") from None
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"config {path}: top level must be a mapping")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``"augment.p=0.5"`` -> ``("augment.p", 0.5)``; values are parsed as JSON when they can be."""
    if "=" not in text:
        raise TrainConfigError(f"override {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def load_train_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[tuple[str, Any]] | None = None,
) -> TrainConfig:
    """Read a JSON/YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` maps keys (``"epochs"``, or dotted ``"augment.p"``) to values;
    ``None`` values are ignored so argparse defaults can be passed straight in.
    ``sets`` (from ``--set KEY=VALUE``, applied last) may set a key to ``None``.
    """
    raw: dict[str, Any] = _read_mapping(Path(path)) if path is not None else {}
    items = [(k, v) for k, v in (overrides or {}).items() if v is not None] + list(sets or [])
    for key, value in items:
        if "." in key:
            head, sub = key.split(".", 1)
            raw.setdefault(head, {})
            if not isinstance(raw[head], dict):
                raise TrainConfigError(f"override {key}: {head} is not a section")
            raw[head] = {**raw[head], sub: value}
        else:
            raw[key] = value
    try:
        return TrainConfig.from_dict(raw)
    except TypeError as e:  # wrong value types reaching the dataclass
        raise TrainConfigError(str(e)) from None
