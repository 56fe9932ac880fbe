"""Training configuration: a dataclass loaded from JSON or YAML, with CLI overrides.

The defaults *are* the third-place recipe (``configs/hpa_seresnext50_512.json`` spells
every one of them out): timm ``seresnext50_32x4d`` from a local ImageNet weight file,
RGBY 512 cache, a random 384 x 384 crop of every training sample, batch 36 per rank,
48 epochs, Adam 3e-4 (beta1 0.9), ReduceLROnPlateau(0.3, patience 8, min_lr 1e-6) on the
validation ComboLoss once per epoch, fp16 AMP on CUDA, the best validation ComboLoss kept
from epoch 2 on, gamma 0.5, the class-balancing sampler and the augmentation groups of
:data:`RECIPE_AUGMENT`.

A config is data, checked at start-up: an unknown key, a value of the wrong type or
out of range raises :class:`TrainConfigError` with one line naming the field
(``augment.warp.transforms.Affine.rotate`` for a nested one). Relative paths are taken
relative to the current directory, the way the command line would take them.

``augment`` is the string ``"none"`` (no augmentation) or a mapping of group name ->
``{"p": ..., "transforms": {...}}``; a group given replaces the recipe group's ``p``
and/or its whole ``transforms`` mapping, groups not given keep the recipe's, a new name
adds a group (after the recipe's) and ``null`` removes one. ``{"groups": {...}}`` (what a
run's ``config.json`` holds) is the complete list instead: exactly those groups, in order. Each transform entry is
``LABEL: {"weight": w, "transform": ALBUMENTATIONS_CLASS (default LABEL), **kwargs}``;
see :mod:`hpa_kernel.train.augment` for how a group is applied and for the
albumentations 1.x -> 2.x mapping of the reference's transforms.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RECIPE_AUGMENT",
    "AugmentGroup",
    "AugmentConfig",
    "TrainConfig",
    "TrainConfigError",
    "load_train_config",
    "parse_override",
]

_REFLECT_101 = 4  # cv2.BORDER_REFLECT_101, the albumentations 1.x default of the warps

#: The reference's augmentation groups, in the order they are applied (albumentations 2.x names).
RECIPE_AUGMENT: dict[str, dict[str, Any]] = {
    "noise": {"p": 0.5, "transforms": {
        # 1.x GaussNoise(var_limit=(5, 30)) on uint8: std sqrt(5)..sqrt(30) = 2.2..5.5 grey levels
        "GaussNoise": {"weight": 0.5, "std_range": [0.0088, 0.0215]},
        "CoarseDropout": {"weight": 0.5, "num_holes_range": [1, 8], "hole_height_range": [1, 32],
                          "hole_width_range": [1, 32], "fill": 0},
        # 1.x IAAAdditiveGaussianNoise(scale=(0.02*255, 0.05*255)): std 2 %..5 % of full scale
        "AdditiveGaussianNoise": {"transform": "GaussNoise", "weight": 0.5, "std_range": [0.02, 0.05]},
    }},
    "flip": {"p": 0.5, "transforms": {"HorizontalFlip": {"weight": 1.0}}},
    "rotate90": {"p": 1.0, "transforms": {"RandomRotate90": {"weight": 1.0}}},
    "warp": {"p": 0.5, "transforms": {
        "GridDistortion": {"weight": 0.15, "num_steps": 5, "distort_limit": 0.3, "border_mode": _REFLECT_101},
        "ShiftScaleRotate": {"transform": "Affine", "weight": 0.75, "translate_percent": [-0.05, 0.05],
                             "scale": [0.9, 1.1], "rotate": [-30, 30], "border_mode": _REFLECT_101},
        "ElasticTransform": {"weight": 0.15, "alpha": 1.0, "sigma": 50.0, "border_mode": _REFLECT_101},
        "OpticalDistortion": {"weight": 0.10, "distort_limit": 0.05, "border_mode": _REFLECT_101},
        "Shear": {"transform": "Affine", "weight": 0.5, "shear": [-5, 5], "border_mode": _REFLECT_101},
    }},
    "blur": {"p": 0.5, "transforms": {
        "GaussianBlur": {"weight": 0.5, "blur_limit": [3, 5]},
        "MotionBlur": {"weight": 0.5, "blur_limit": [3, 5]},
        "MedianBlur": {"weight": 0.5, "blur_limit": [3, 7]},
    }},
    "colour": {"p": 0.25, "transforms": {
        "RandomGamma": {"weight": 0.5, "gamma_limit": [80, 120]},
        "RandomBrightnessContrast": {"weight": 0.5, "brightness_limit": 0.2, "contrast_limit": 0.2},
    }},
}


class TrainConfigError(ValueError):
    """The training config is malformed; the message is one line naming the field."""


@dataclass
class AugmentGroup:
    """One augmentation group: applied with probability ``p``; when applied, exactly one
    of its ``transforms`` is drawn, with probability proportional to its ``weight``."""

    p: float
    transforms: dict[str, dict[str, Any]]


def _recipe_groups() -> dict[str, AugmentGroup]:
    return {k: AugmentGroup(float(v["p"]), copy.deepcopy(v["transforms"])) for k, v in RECIPE_AUGMENT.items()}


@dataclass
class AugmentConfig:
    """The augmentation groups, in order (:data:`RECIPE_AUGMENT` by default; ``{}`` = none)."""

    groups: dict[str, AugmentGroup] = field(default_factory=_recipe_groups)

    @classmethod
    def from_raw(cls, raw: Any) -> "AugmentConfig":
        """``"none"``, ``None`` / ``{}`` (the recipe), a mapping of group overrides, or
        ``{"groups": {...}}``: the complete list of groups, in order, as :meth:`TrainConfig.to_dict`
        writes it (the run's ``config.json`` loads back as it was written); other keys beside
        ``groups`` (``--set augment.noise.p=0.3``) then override those groups, not the recipe's."""
        if raw == "none":
            return cls(groups={})
        if raw is None:
            return cls()
        if isinstance(raw, AugmentConfig):
            return raw
        if not isinstance(raw, dict):
            raise TrainConfigError(f"augment: expected a mapping of groups or 'none', got {raw!r}")
        raw = dict(raw)
        groups = cls._complete(raw.pop("groups")).groups if "groups" in raw else _recipe_groups()
        for name, spec in raw.items():
            where = f"augment.{name}"
            if spec is None:
                groups.pop(name, None)
                continue
            if isinstance(spec, AugmentGroup):
                groups[name] = spec
                continue
            if not isinstance(spec, dict):
                raise TrainConfigError(f"{where}: expected {{'p': ..., 'transforms': {{...}}}}, got {spec!r}")
            unknown = sorted(set(spec) - {"p", "transforms"})
            if unknown:
                raise TrainConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (a group has p and transforms)")
            base = groups.get(name)
            if base is None and not {"p", "transforms"} <= set(spec):
                raise TrainConfigError(f"{where}: a new group needs both p and transforms")
            p = spec.get("p", base.p if base else None)
            transforms = spec.get("transforms", base.transforms if base else None)
            groups[name] = AugmentGroup(p, copy.deepcopy(transforms))
        return cls(groups=groups)

    @classmethod
    def _complete(cls, raw: Any) -> "AugmentConfig":
        """``augment.groups``: every group spelt out (nothing taken from the recipe)."""
        if not isinstance(raw, dict):
            raise TrainConfigError(f"augment.groups: expected a mapping of group name -> {{p, transforms}}, got {raw!r}")
        groups = {}
        for name, spec in raw.items():
            where = f"augment.groups.{name}"
            if not isinstance(spec, dict) or set(spec) != {"p", "transforms"}:
                raise TrainConfigError(f"{where}: expected exactly {{'p': ..., 'transforms': {{...}}}}, got {spec!r}")
            groups[name] = AugmentGroup(spec["p"], copy.deepcopy(spec["transforms"]))
        return cls(groups=groups)

    def validate(self) -> "AugmentConfig":
        """Structure and ranges (the albumentations arguments are checked when the pipeline is built)."""
        for name, g in self.groups.items():
            where = f"augment.{name}"
            if isinstance(g.p, bool) or not isinstance(g.p, (int, float)) or not 0.0 <= g.p <= 1.0:
                raise TrainConfigError(f"{where}.p: must be a number in [0, 1], not {g.p!r}")
            if not isinstance(g.transforms, dict) or not g.transforms:
                raise TrainConfigError(f"{where}.transforms: must be a non-empty mapping LABEL -> {{weight, ...}}")
            for label, t in g.transforms.items():
                if not isinstance(t, dict):
                    raise TrainConfigError(f"{where}.transforms.{label}: expected a mapping, got {t!r}")
                w = t.get("weight", None)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                    raise TrainConfigError(f"{where}.transforms.{label}.weight: must be a number > 0, not {w!r}")
                if not isinstance(t.get("transform", label), str):
                    raise TrainConfigError(f"{where}.transforms.{label}.transform: must be an albumentations class name")
        return self

    def describe(self) -> str:
        """One line: ``noise p0.5 [GaussNoise 0.5, ...]; flip p0.5 [...]; ...``."""
        if not self.groups:
            return "none"
        parts = []
        for name, g in self.groups.items():
            inner = ", ".join(f"{label} {t['weight']:g}" for label, t in g.transforms.items())
            parts.append(f"{name} p{g.p:g} [{inner}]")
        return "; ".join(parts)


@dataclass
class TrainConfig:
    """Everything one training run needs; ``python -m hpa_kernel.train --config``."""

    # data
    index_csv: str = "cache/index.csv"
    fold: int = 0  # validation fold; the others train. -1 = train on all, validate on none
    n_folds: int = 4
    image_size: int = 512  # the cached image is resized to this (the model's full-image input)
    train_crop: int | None = 384  # random square crop of every training sample (None = whole image)
    crop_size: int = 384  # Step 2 cell-crop side, recorded in the checkpoint for the kernel
    val_cells_csv: str | None = None  # evaluation only: per-cell F1/mAP of the validation fold's cells
    val_cells_max: int = 512  # validation cells scored per epoch (first N of the fold)
    # model
    backbone: str = "seresnext50_32x4d"
    pretrained: bool = True  # ImageNet start from pretrained_file (a local file, never a download)
    pretrained_file: str | None = None
    num_classes: int = 19
    # optimisation
    epochs: int = 48
    batch_size: int = 36  # per rank: the global batch is batch_size x world size
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    plateau_factor: float = 0.3
    plateau_patience: int = 8
    min_lr: float = 1e-6
    best_from_epoch: int = 2  # best.pt is kept from this (1-based) epoch on
    gamma: float = 0.5  # weight of L1(F, F_re) in the ComboLoss
    puzzle_grid: int = 2
    amp: bool = True  # fp16 autocast + GradScaler, used on CUDA only
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    # sampling
    sampler: str = "weighted"  # "weighted" (the recipe's class balancing) or "uniform"
    sampler_clip_rank: int = 3  # image weights clipped at the k-th largest class weight
    samples_per_epoch: int | None = None  # per epoch over all ranks; None = number of training images
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # runtime
    workers: int | None = None  # DataLoader workers per rank; None = from the CPU count
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int | None = None  # torch.set_num_threads on CPU (None = leave)
    out: str = "runs/train"
    resume: str | None = None  # last.pt of this stage: continue it (optimiser, scheduler, epoch)
    init_from: str | None = None  # a checkpoint of an earlier stage: its weights, fresh schedule
    save_fp16: bool = False  # store best.pt weights as fp16 (shipping size)
    max_batches: int | None = None  # cap batches per epoch (smoke tests)
    time_budget_min: float | None = None  # stop before an epoch that would end past this many minutes
    log_every: int = 20  # steps between progress-bar loss updates (each one is a host sync)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Types and ranges; returns ``self`` so calls chain. Raises :class:`TrainConfigError`."""
        _check_types(self)
        self.augment.validate()
        unit = 32 * self.puzzle_grid
        if self.image_size % unit:
            raise TrainConfigError(
                f"image_size: {self.image_size} must be a multiple of {unit} "
                f"(stride 32 x puzzle grid {self.puzzle_grid}) so tile maps stitch exactly"
            )
        if self.train_crop is not None and (self.train_crop % unit or not 0 < self.train_crop <= self.image_size):
            raise TrainConfigError(f"train_crop: {self.train_crop} must be <= image_size and a multiple of {unit}")
        if self.crop_size < 32 or self.crop_size % 32:
            raise TrainConfigError(f"crop_size: {self.crop_size} must be a multiple of 32")
        _positive(self, "epochs", "batch_size", "num_classes", "puzzle_grid", "log_every", "sampler_clip_rank",
                  "n_folds", "best_from_epoch")
        _positive(self, "lr", "min_lr", "plateau_factor", "val_cells_max")
        if self.plateau_factor >= 1:
            raise TrainConfigError(f"plateau_factor: {self.plateau_factor} must be < 1")
        if self.sampler not in ("weighted", "uniform"):
            raise TrainConfigError(f"sampler: must be 'weighted' or 'uniform', not {self.sampler!r}")
        if not -1 <= self.fold < self.n_folds:
            raise TrainConfigError(f"fold: {self.fold} outside -1..{self.n_folds - 1}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device: must be auto/cpu/cuda, not {self.device!r}")
        for name in ("workers", "threads", "max_batches", "samples_per_epoch"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "workers" else 1):
                raise TrainConfigError(f"{name}: {v} is out of range")
        if self.resume and self.init_from:
            raise TrainConfigError("init_from: give resume (continue this stage) or init_from (new stage), not both")
        return self

    def check_files(self) -> None:
        """The files the run reads exist (one line naming the field and the path otherwise)."""
        for name in ("index_csv", "resume", "init_from", "val_cells_csv"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise TrainConfigError(f"{name}: file {path} not found")
        if self.pretrained and not self.init_from:
            hint = pretrained_hint(self.backbone, self.pretrained_file or f"pretrained/{self.backbone}.pth")
            if not self.pretrained_file:
                raise TrainConfigError(f"pretrained_file: pretrained is true but no file is set; {hint}")
            if not Path(self.pretrained_file).is_file():
                raise TrainConfigError(f"pretrained_file: {self.pretrained_file} not found; {hint}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def defaults_used(self) -> dict[str, Any]:
        """The fields the config file and overrides did not set, with their default values."""
        given = getattr(self, "_given", None)
        if given is None:
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in given
                and f.name != "augment"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainConfigError(f"unknown config key(s): {', '.join(unknown)}")
        given = frozenset(raw)
        raw["augment"] = AugmentConfig.from_raw(raw.get("augment"))
        cfg = cls(**raw)
        object.__setattr__(cfg, "_given", given)
        return cfg.validate()


def pretrained_hint(backbone: str, path: str) -> str:
    """How to get a backbone's ImageNet weights into ``path`` on a machine with internet."""
    try:
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(backbone)
        hub = pcfg.hf_hub_id if pcfg is not None and pcfg.hf_hub_id else None
    except Exception:  # noqa: BLE001 - an unknown name: the timm call below says so
        hub = None
    where = f" (Hugging Face {hub})" if hub else ""
    return (
        f"get it on a machine with internet with: python -c \"import timm, torch; "
        f"torch.save(timm.create_model('{backbone}', pretrained=True).state_dict(), '{path}')\"{where}, "
        "copy it here (or attach it as a Kaggle dataset), or set pretrained false"
    )


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v <= 0:
            raise TrainConfigError(f"{name}: must be > 0, not {v!r}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(hint, "__name__", str(hint))


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _type_ok(value, hints[f.name]):
            raise TrainConfigError(f"{f.name}: expected {_type_name(hints[f.name])}, got {type(value).__name__} {value!r}")
        if hints[f.name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
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
    """``"augment.noise.p=0.3"`` -> ``("augment.noise.p", 0.3)``; values are parsed as JSON when they can be."""
    if "=" not in text:
        raise TrainConfigError(f"override {text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    head, *rest = key.split(".")
    if not rest:
        raw[head] = value
        return
    sub = raw.get(head)
    if sub is None:
        sub = {}
    if not isinstance(sub, dict):
        raise TrainConfigError(f"override {key}: {head} is not a section")
    sub = dict(sub)
    _set_dotted(sub, ".".join(rest), value)
    raw[head] = sub


def load_train_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[tuple[str, Any]] | None = None,
) -> TrainConfig:
    """Read a JSON/YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` maps keys (``"epochs"``, or dotted ``"augment.noise.p"``) to values;
    ``None`` values are ignored so argparse defaults can be passed straight in.
    ``sets`` (from ``--set KEY=VALUE``, applied last) may set a key to ``None``.
    """
    raw: dict[str, Any] = _read_mapping(Path(path)) if path is not None else {}
    items = [(k, v) for k, v in (overrides or {}).items() if v is not None] + list(sets or [])
    for key, value in items:
        _set_dotted(raw, key, value)
    try:
        return TrainConfig.from_dict(raw)
    except TypeError as e:  # e.g. a group given as a list
        raise TrainConfigError(str(e).splitlines()[0]) from None
