"""Kernel configuration: the weights manifest as a dataclass.

A manifest is a JSON file (``weights/manifest.json`` by default)::

    {
      "segmentation": {"method": "classic"}                       # weight-free
      # or {"method": "hpa", "nuclei": "dpn_unet_nuclei_v1.pth",
      #     "cell": "dpn_unet_cell_3ch_v1.pth", "scale": "512"}
      "classifiers": [{"path": "demo/model.pt", "weight": 1.0}],
      # the third-place team's files as they are, four folds averaged as one model:
      # {"paths": [".../fold1/stage1/snapshots/model_best.pt", ...], "format": "mpware",
      #  "weight": 1.0}   (+ optional "backbone", "image_size", "crop_size")
      "step_weights": {"step1": 0.5, "step2": 0.5},               # or a pair of 19-vectors
                                                                  # (per class; train.fit_weights)
      "step1": {"cam": "relu_max"},                               # or "minmax" (measured option)
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
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.json"
ENV_MANIFEST = "HPA_KERNEL_WEIGHTS"
#: a manifest larger than this is refused unread (one with per-class weights is ~2 KB)
MAX_MANIFEST_BYTES = 16 << 20
#: the segmenters a manifest may name (``segmentation.method``); each is one registered
#: class of :mod:`hpa_kernel.stages.segmentation` (a test keeps the two lists equal)
SEGMENTATION_METHODS: tuple[str, ...] = ("classic", "hpa")
#: the most classes a prediction may keep (``top_classes``): ``classes.NUM_CLASSES``,
#: written out because this module imports nothing of the package (a test keeps them equal)
MAX_TOP_CLASSES = 19
#: the largest Step 2 crop side (``crop_size``, the manifest's and a checkpoint's; a 4096 px
#: crop of 38 cells needed 9.5 GiB)
MAX_CROP_SIZE = 1024
#: the classifier file formats a manifest entry may name (``classifiers[i].format``): ours
#: (self-describing, ``stages.model.save_checkpoint``) and the third-place team's
#: (``stages.mpware``); the first is the default
CLASSIFIER_FORMATS: tuple[str, ...] = ("hpa_kernel", "mpware")
_CLASSIFIER_KEYS = {"path", "paths", "weight", "format", "backbone", "image_size", "crop_size"}
#: how Step 1 turns class maps into CAMs (``step1.cam``, ``stages.model.ClassMapModel.cams``):
#: ``"relu_max"`` is the reference (the default); ``"minmax"`` keeps the ranking of cells
#: inside a map that is negative everywhere and measures a cell's height from the map's floor
CAM_NORMS: tuple[str, ...] = ("relu_max", "minmax")


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
    """One manifest classifier entry: a file, or several folds averaged as one model."""

    paths: tuple[Path, ...]
    weight: float = 1.0
    #: the files' format: ``"hpa_kernel"`` (ours, with meta) or ``"mpware"`` (the third-place
    #: team's plain state dicts; ``backbone``/``image_size``/``crop_size`` fill what their
    #: run folder's name does not say)
    format: str = "hpa_kernel"
    backbone: str | None = None
    image_size: int | None = None
    crop_size: int | None = None

    @property
    def path(self) -> Path:
        """The first file (the entry's name in messages)."""
        return self.paths[0]

    @property
    def name(self) -> str:
        """The entry in words: its file name, ``+N folds`` for a group."""
        more = f" (+{len(self.paths) - 1} fold(s))" if len(self.paths) > 1 else ""
        return f"{self.paths[0].name}{more}"


@dataclass
class KernelConfig:
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    classifiers: list[ClassifierConfig] = field(default_factory=list)
    #: Step 1 / Step 2 weights: one number each, or one per class (tuples of 19)
    step1_weight: float | tuple[float, ...] = 0.5
    step2_weight: float | tuple[float, ...] = 0.5
    cam_norm: str = "relu_max"  # step1.cam: CAM normalisation (CAM_NORMS)
    top_classes: int = 18
    min_confidence: float = 0.0
    crop_size: int | None = None  # None: each checkpoint's crop_size (384 if it names none)
    batch_size: int = 16
    image_size: int = 512
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path = Path(".")
    source: Path | None = None

    @property
    def use_step1(self) -> bool:
        """Step 1 has a positive weight for some class."""
        return max(_as_tuple(self.step1_weight)) > 0

    @property
    def use_step2(self) -> bool:
        """Step 2 has a positive weight for some class."""
        return max(_as_tuple(self.step2_weight)) > 0

    def replace(self, **changes: Any) -> "KernelConfig":
        return dataclasses.replace(self, **changes)


def _as_tuple(w: float | tuple[float, ...]) -> tuple[float, ...]:
    return tuple(w) if isinstance(w, (tuple, list)) else (w,)


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
    try:
        full = (root / p).resolve()
    except (RuntimeError, OSError) as e:  # "Symlink loop from ..." and the like
        raise ConfigError(f"{what}: path {value!r} cannot be resolved ({e})") from None
    if not allow_outside and not full.is_relative_to(root.resolve()):
        raise ConfigError(f"{what}: path {value!r} escapes the manifest folder {root}")
    return full


def load_config(path: str | Path | None = None, allow_outside: bool = False) -> KernelConfig:
    """Read a manifest into a :class:`KernelConfig` (``None`` = the bundled one)."""
    path = Path(path) if path is not None else default_manifest()
    if path.is_dir():
        path = path / "manifest.json"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"manifest {path} not found (name one with --weights or ${ENV_MANIFEST})") from None
    except OSError as e:  # a symlink loop, a permission
        raise ConfigError(f"manifest {path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never ends
        raise ConfigError(f"manifest {path}: not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(f"manifest {path}: {st.st_size:,} bytes, over {MAX_MANIFEST_BYTES:,}; not a manifest")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"manifest {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"manifest {path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"manifest {path}: top level must be an object")
    try:
        return config_from_dict(raw, root=path.parent, allow_outside=allow_outside, source=path)
    except ConfigError as e:
        raise ConfigError(f"manifest {path}: {e}") from None


def write_manifest(path: str | Path, raw: dict[str, Any]) -> Path:
    """Write a manifest (the one writer: ``integrity --update``, ``train.fit_weights``):
    JSON, indented, replaced atomically through :func:`hpa_kernel.formats.atomic.atomic_write`
    (a kill leaves the old file), keeping the mode of the file it replaces."""
    from hpa_kernel.formats.atomic import atomic_write

    return atomic_write(path, (json.dumps(raw, indent=2) + "\n").encode(), keep_mode=True)


def _integer(value: Any, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, else :class:`ConfigError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{what} must be {bounds}, not {value}")
    return value


def _number(value: Any, what: str, low: float = 0.0, high: float | None = None, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, not {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (low_open and v == low) or (high is not None and v > high):
        bounds = (f"> {low:g}" if low_open else f">= {low:g}") + ("" if high is None else f" and <= {high:g}")
        raise ConfigError(f"{what} must be a finite number {bounds}, not {value!r}")
    return v


def _weights(value: Any, what: str) -> float | tuple[float, ...]:
    """A step weight: one number >= 0, or a list of MAX_TOP_CLASSES (= 19) numbers >= 0."""
    if isinstance(value, list):
        if len(value) != MAX_TOP_CLASSES:
            raise ConfigError(f"{what} must be a number or a list of {MAX_TOP_CLASSES} numbers, not {len(value)}")
        return tuple(_number(v, f"{what}[{i}]") for i, v in enumerate(value))
    return _number(value, what)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be an object, not {value!r}")
    return value


def _text(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {value!r}")
    return value


def _classifier(c: Any, what: str, root: Path, allow_outside: bool) -> ClassifierConfig:
    """One ``classifiers`` entry: ``"path"`` (or the shorthand of a bare string) or
    ``"paths"`` (folds averaged as one model), ``weight`` > 0, ``format`` (one of
    :data:`CLASSIFIER_FORMATS`) and, for ``"mpware"`` only, ``backbone``, ``image_size``,
    ``crop_size``. Unknown keys are refused."""
    if isinstance(c, str):  # shorthand: a path, weight 1
        c = {"path": c}
    c = _obj(c, what)
    _known_keys(c, _CLASSIFIER_KEYS, f"{what}: ")
    if "path" in c and "paths" in c:
        raise ConfigError(f"{what}.paths: give 'path' (a file) or 'paths' (folds averaged as one model), not both")
    if "path" not in c and "paths" not in c:
        raise ConfigError(f"{what}.path must be a non-empty string (or give 'paths', folds averaged as one model)")
    names = c["paths"] if "paths" in c else [c["path"]]
    key = "paths" if "paths" in c else "path"
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{what}.paths must be a non-empty list of strings, not {names!r}")
    for k, name in enumerate(names):
        if not isinstance(name, str) or not name:
            where = f"{what}.paths[{k}]" if key == "paths" else f"{what}.path"
            raise ConfigError(f"{where} must be a non-empty string, not {name!r}")
    fmt = c.get("format", CLASSIFIER_FORMATS[0])
    if fmt not in CLASSIFIER_FORMATS:
        raise ConfigError(f"{what}.format must be one of {list(CLASSIFIER_FORMATS)}, not {fmt!r}")
    team = {k: c[k] for k in ("backbone", "image_size", "crop_size") if c.get(k) is not None}
    if team and fmt != "mpware":
        raise ConfigError(f"{what}.{next(iter(team))}: only for \"format\": \"mpware\" (our checkpoints carry their own)")
    return ClassifierConfig(
        paths=tuple(
            _resolve(root, n, f"{what}.paths[{k}]" if key == "paths" else f"{what}.path", allow_outside)
            for k, n in enumerate(names)
        ),
        weight=_number(c.get("weight", 1.0), f"{what}.weight", low_open=True),
        format=fmt,
        backbone=_text(team.get("backbone"), f"{what}.backbone"),
        image_size=_integer(team["image_size"], f"{what}.image_size") if "image_size" in team else None,
        crop_size=_integer(team["crop_size"], f"{what}.crop_size", 1, MAX_CROP_SIZE) if "crop_size" in team else None,
    )


_TOP_KEYS = {"segmentation", "classifiers", "step_weights", "step1", "top_classes", "min_confidence",
             "crop_size", "batch_size", "image_size", "files"}
_SEGMENTATION_KEYS = {"method", "nuclei", "cell", "scale", "batch_size"}


def _known_keys(obj: dict[str, Any], known: set[str], what: str) -> None:
    """:class:`ConfigError` naming the first unknown key of ``obj`` and the closest known one."""
    import difflib

    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"{what}unknown key {key!r}{hint}")


def _segmentation(raw: dict[str, Any], root: Path, allow_outside: bool) -> SegmentationConfig:
    seg_raw = _obj(raw.get("segmentation", {"method": "classic"}), "segmentation")
    _known_keys(seg_raw, _SEGMENTATION_KEYS, "segmentation: ")
    method = seg_raw.get("method", "hpa" if seg_raw.get("cell") else "classic")
    if method not in SEGMENTATION_METHODS:
        raise ConfigError(f"segmentation.method must be one of {list(SEGMENTATION_METHODS)}, not {method!r}")
    seg = SegmentationConfig(
        method=method,
        nuclei=_resolve(root, _text(seg_raw.get("nuclei"), "segmentation.nuclei"), "segmentation.nuclei", allow_outside),
        cell=_resolve(root, _text(seg_raw.get("cell"), "segmentation.cell"), "segmentation.cell", allow_outside),
        scale=str(seg_raw.get("scale", "512")),
        batch_size=_integer(seg_raw.get("batch_size", 4), "segmentation.batch_size"),
    )
    if seg.method == "hpa" and (seg.nuclei is None or seg.cell is None):
        raise ConfigError("segmentation.method 'hpa' needs both 'nuclei' and 'cell' weight paths")
    if seg.scale not in ("512", "full"):
        raise ConfigError(f"segmentation.scale must be '512' or 'full', not {seg.scale!r}")
    return seg


def _classifiers(raw: dict[str, Any], root: Path, allow_outside: bool) -> list[ClassifierConfig]:
    """The ``classifiers`` list (none is valid here; a run refuses to start without a usable
    one), weights whose sum is finite."""
    items = raw.get("classifiers", [])
    if not isinstance(items, list):
        raise ConfigError(f"classifiers must be a list of {{\"path\", \"weight\"}} objects, not {items!r}")
    classifiers = [_classifier(c, f"classifiers[{i}]", root, allow_outside) for i, c in enumerate(items)]
    if not math.isfinite(sum(c.weight for c in classifiers)):
        raise ConfigError("classifiers: the weights' sum overflows; scale them down (only their ratios matter)")
    return classifiers


def _step_weights(raw: dict[str, Any]) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
    sw = _obj(raw.get("step_weights", {}), "step_weights")
    _known_keys(sw, {"step1", "step2"}, "step_weights: ")
    step1 = _weights(sw.get("step1", 0.5), "step_weights.step1")
    step2 = _weights(sw.get("step2", 0.5), "step_weights.step2")
    w1, w2 = _as_tuple(step1), _as_tuple(step2)
    both_zero = [c for c in range(max(len(w1), len(w2))) if w1[c % len(w1)] + w2[c % len(w2)] <= 0]
    if both_zero:
        where = "" if len(w1) == len(w2) == 1 else f" for class {both_zero[0]}"
        raise ConfigError(f"step_weights: step1 and step2 may not both be 0{where}")
    return step1, step2


def _files(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``files`` section: ``{path: {"size": int >= 0, "sha256": str}}`` (a digest that
    does not match is the integrity check's to report, and ``--update`` rewrites it)."""
    files = _obj(raw.get("files", {}), "files")
    for key, entry in files.items():
        what = f"files[{key!r}]"
        entry = _obj(entry, what)
        _known_keys(entry, {"size", "sha256"}, f"{what}: ")
        if "size" in entry:
            _integer(entry["size"], f"{what}.size", 0)
        if not isinstance(entry.get("sha256", ""), str):
            raise ConfigError(f"{what}.sha256 must be a string of hex digits, not {entry['sha256']!r}")
    return dict(files)


def config_from_dict(
    raw: dict[str, Any], root: Path, allow_outside: bool = False, source: Path | None = None
) -> KernelConfig:
    """A :class:`KernelConfig` from a parsed manifest, every value checked.

    Raises :class:`ConfigError` with one line naming the first bad field: an unknown key at
    any level (with the closest known one), a wrong type (``"weight": "heavy"``), a NaN or
    infinity, or a value out of range (``top_classes`` 1..19, ``min_confidence`` in [0, 1],
    step weights >= 0 (a number or 19 of them) and not both 0 for any class, ``step1.cam``
    one of :data:`CAM_NORMS`, classifier weights > 0 with a finite
    sum, sizes and batch sizes >= 1, ``crop_size`` <= :data:`MAX_CROP_SIZE`, ``image_size``
    a multiple of 32, ``files`` entries ``{"size": int, "sha256": str}``).
    """
    root = Path(root)
    _known_keys(raw, _TOP_KEYS, "")
    seg = _segmentation(raw, root, allow_outside)
    classifiers = _classifiers(raw, root, allow_outside)
    step1, step2 = _step_weights(raw)
    s1_raw = _obj(raw.get("step1", {}), "step1")
    _known_keys(s1_raw, {"cam"}, "step1: ")
    cam_norm = s1_raw.get("cam", CAM_NORMS[0])
    if cam_norm not in CAM_NORMS:
        raise ConfigError(f"step1.cam must be one of {list(CAM_NORMS)}, not {cam_norm!r}")
    image_size = _integer(raw.get("image_size", 512), "image_size")
    if image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32, not {image_size}")
    return KernelConfig(
        segmentation=seg,
        classifiers=classifiers,
        step1_weight=step1,
        step2_weight=step2,
        cam_norm=cam_norm,
        top_classes=_integer(raw.get("top_classes", 18), "top_classes", 1, MAX_TOP_CLASSES),
        min_confidence=_number(raw.get("min_confidence", 0.0), "min_confidence", 0.0, 1.0),
        crop_size=_integer(raw["crop_size"], "crop_size", 1, MAX_CROP_SIZE) if raw.get("crop_size") is not None else None,
        batch_size=_integer(raw.get("batch_size", 16), "batch_size"),
        image_size=image_size,
        files=_files(raw),
        root=root,
        source=source,
    )
