"""Kernel configuration: the weights manifest as a dataclass.

A manifest is a JSON file (``weights/manifest.json`` by default)::

    {
      "segmentation": {"method": "classic"}                       # weight-free
      # or {"method": "hpa", "nuclei": "dpn_unet_nuclei_v1.pth",
      #     "cell": "dpn_unet_cell_3ch_v1.pth", "scale": "512"}
      "classifiers": [{"path": "demo/model.pt", "weight": 1.0}],
      "step_weights": {"step1": 0.5, "step2": 0.5},
      "top_classes": 18, "min_confidence": 0.0,
      "batch_size": 16, "image_size": 512,
      # "crop_size": 384,   optional: Step 2 crop side for every classifier; left out, each
      #                     classifier uses its checkpoint's (what it was trained with)
      "files": {"demo/model.pt": {"size": 123, "sha256": "..."}}
    }

Relative paths are resolved against the manifest's folder and may not leave it
(``..`` or absolute paths are refused unless ``allow_outside=True``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.json"
ENV_MANIFEST = "HPA_KERNEL_WEIGHTS"
#: the segmenters a manifest may name (``segmentation.method``); each is one registered
#: class of :mod:`hpa_kernel.stages.segmentation` (a test keeps the two lists equal)
SEGMENTATION_METHODS: tuple[str, ...] = ("classic", "hpa")


def default_manifest() -> Path:
    """The manifest used when none is named.

    ``$HPA_KERNEL_WEIGHTS`` if set, else the repository's ``weights/manifest.json`` (a
    source checkout or editable install), else ``./weights/manifest.json``.
    """
    env = os.environ.get(ENV_MANIFEST)
    if env:
        return Path(env)
    if DEFAULT_MANIFEST.exists():
        return DEFAULT_MANIFEST
    return Path("weights") / "manifest.json"


class ConfigError(ValueError):
    """The manifest is missing, malformed or names files it may not."""


@dataclass
class SegmentationConfig:
    method: str = "classic"  # "classic" (weight-free) or "hpa" (DPN U-Nets)
    nuclei: Path | None = None
    cell: Path | None = None
    scale: str = "512"  # "512" (fast path) or "full" (stock hpacellseg flow)
    batch_size: int = 4


@dataclass
class ClassifierConfig:
    path: Path
    weight: float = 1.0


@dataclass
class KernelConfig:
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    classifiers: list[ClassifierConfig] = field(default_factory=list)
    step1_weight: float = 0.5
    step2_weight: float = 0.5
    top_classes: int = 18
    min_confidence: float = 0.0
    crop_size: int | None = None  # None: each checkpoint's crop_size (384 if it names none)
    batch_size: int = 16
    image_size: int = 512
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path = Path(".")
    source: Path | None = None

    @property
    def use_step2(self) -> bool:
        return self.step2_weight > 0

    def replace(self, **changes: Any) -> "KernelConfig":
        return dataclasses.replace(self, **changes)


def _resolve(root: Path, value: str | None, what: str, allow_outside: bool) -> Path | None:
    if value is None or value == "":
        return None
    p = Path(value)
    if p.is_absolute():
        if not allow_outside:
            raise ConfigError(
                f"{what}: absolute path {value!r} refused (pass allow_outside=True / --allow-outside-paths)"
            )
        return p
    full = (root / p).resolve()
    if not allow_outside and not full.is_relative_to(root.resolve()):
        raise ConfigError(f"{what}: path {value!r} escapes the manifest folder {root}")
    return full


def load_config(path: str | Path | None = None, allow_outside: bool = False) -> KernelConfig:
    """Read a manifest into a :class:`KernelConfig` (``None`` = the bundled one)."""
    path = Path(path) if path is not None else default_manifest()
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise ConfigError(f"manifest {path} not found (name one with --weights or ${ENV_MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"manifest {path}: top level must be an object")
    return config_from_dict(raw, root=path.parent, allow_outside=allow_outside, source=path)


def config_from_dict(
    raw: dict[str, Any], root: Path, allow_outside: bool = False, source: Path | None = None
) -> KernelConfig:
    root = Path(root)
    seg_raw = raw.get("segmentation", {"method": "classic"})
    if isinstance(seg_raw, str):
        seg_raw = {"method": seg_raw}
    method = seg_raw.get("method", "hpa" if seg_raw.get("cell") else "classic")
    if method not in SEGMENTATION_METHODS:
        raise ConfigError(f"segmentation.method must be one of {list(SEGMENTATION_METHODS)}, not {method!r}")
    seg = SegmentationConfig(
        method=method,
        nuclei=_resolve(root, seg_raw.get("nuclei"), "segmentation.nuclei", allow_outside),
        cell=_resolve(root, seg_raw.get("cell"), "segmentation.cell", allow_outside),
        scale=str(seg_raw.get("scale", "512")),
        batch_size=int(seg_raw.get("batch_size", 4)),
    )
    if seg.method == "hpa" and (seg.nuclei is None or seg.cell is None):
        raise ConfigError("segmentation.method 'hpa' needs both 'nuclei' and 'cell' weight paths")
    if seg.scale not in ("512", "full"):
        raise ConfigError(f"segmentation.scale must be '512' or 'full', not {seg.scale!r}")
    classifiers = []
    for i, c in enumerate(raw.get("classifiers", [])):
        if isinstance(c, str):
            c = {"path": c}
        if "path" not in c:
            raise ConfigError(f"classifiers[{i}] has no 'path'")
        classifiers.append(
            ClassifierConfig(
                path=_resolve(root, c["path"], f"classifiers[{i}].path", allow_outside),
                weight=float(c.get("weight", 1.0)),
            )
        )
    sw = raw.get("step_weights", {})
    cfg = KernelConfig(
        segmentation=seg,
        classifiers=classifiers,
        step1_weight=float(sw.get("step1", 0.5)),
        step2_weight=float(sw.get("step2", 0.5)),
        top_classes=int(raw.get("top_classes", 18)),
        min_confidence=float(raw.get("min_confidence", 0.0)),
        crop_size=int(raw["crop_size"]) if raw.get("crop_size") is not None else None,
        batch_size=int(raw.get("batch_size", 16)),
        image_size=int(raw.get("image_size", 512)),
        files=dict(raw.get("files", {})),
        root=root,
        source=source,
    )
    if cfg.step1_weight < 0 or cfg.step2_weight < 0 or cfg.step1_weight + cfg.step2_weight <= 0:
        raise ConfigError("step_weights must be non-negative and not both zero")
    if cfg.crop_size is not None and cfg.crop_size < 1:
        raise ConfigError(f"crop_size must be a positive number of pixels, not {cfg.crop_size}")
    if cfg.image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32, not {cfg.image_size}")
    return cfg
