"""Puzzle-CAM classifier on RGBY images (``docs/METHOD.md``, "Classifier") and its self-describing checkpoints.

A timm backbone (``num_classes=0, global_pool=''``) gives feature maps; a bias-free 1×1
conv turns them into class maps ``F (B, 19, h, w)``; the logits are the global average of
``F``. CAMs are ``relu(relu(F) - 1e-5)`` divided per class by the spatial max of ``relu(F)``
(+1e-5), in [0, 1] (the reference's ``make_cam``, ``"relu_max"``), or, as a measured manifest option, ``"minmax"``:
``(F - min F) / (max F - min F)`` per class (:data:`CAM_NORMS`, :meth:`PuzzleCAM.cams`).

A pretrained 3-channel stem is widened to RGBY with the mean of its RGB filters as the 4th
(yellow) filter (:func:`widen_stem`). Checkpoints (:func:`save_checkpoint`) carry what is
needed to rebuild the model (backbone name, classes, channels, sizes, normalisation), and
:func:`load_checkpoint` reads them with ``torch.load(weights_only=True)``: a weight file
never runs code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import CAM_NORMS, MAX_CROP_SIZE  # the names step1.cam may take; the largest crop side
from hpa_kernel.stages.inputs import DEFAULT_PIPELINE, INPUT_PIPELINES, get_pipeline

__all__ = [
    "RGBY_MEAN",
    "RGBY_STD",
    "CHECKPOINT_FORMAT",
    "CAM_NORMS",
    "CheckpointError",
    "ClassMapModel",
    "PuzzleCAM",
    "FoldGroup",
    "widen_stem",
    "widen_model_stem",
    "normalize",
    "TTA_FLIPS",
    "flip_views",
    "forward_tta",
    "save_checkpoint",
    "check_meta",
    "load_checkpoint",
]

RGBY_MEAN: tuple[float, float, float, float] = (0.485, 0.456, 0.406, 0.485)
RGBY_STD: tuple[float, float, float, float] = (0.229, 0.224, 0.225, 0.229)
CHECKPOINT_FORMAT = "hpa_kernel.puzzlecam/1"
CAM_EPS = 1e-5


class CheckpointError(ValueError):
    """A file is not a usable Puzzle-CAM checkpoint; the message names the file."""


# --------------------------------------------------------------------------- stem widening


def widen_stem(conv_weight: torch.Tensor) -> torch.Tensor:
    """``(O, 3, k, k)`` RGB filters -> ``(O, 4, k, k)`` RGBY: the 4th is the mean of RGB.

    Pure: returns a new tensor, same dtype and device.
    """
    if conv_weight.ndim != 4 or conv_weight.shape[1] != 3:
        raise ValueError(f"expected conv weights (O, 3, k, k), got {tuple(conv_weight.shape)}")
    return torch.cat([conv_weight, conv_weight.mean(dim=1, keepdim=True)], dim=1)


def _first_conv_names(model: nn.Module) -> list[str]:
    names = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(names, str):
        names = [names]
    names = [n for n in (names or []) if n]
    if not names:  # fall back to the first Conv2d taking 3 channels
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3][:1]
    return names


def widen_model_stem(model: nn.Module) -> nn.Module:
    """Widen a timm model's 3-channel input conv(s) to 4 channels in place (:func:`widen_stem`).

    The input conv is found through ``model.pretrained_cfg["first_conv"]`` (timm's own
    record of it), else as the first ``Conv2d`` with 3 input channels.
    """
    names = _first_conv_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__}: no 3-channel input conv found to widen")
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
            raise ValueError(f"{type(model).__name__}.{name} is not a plain 3-channel Conv2d")
        with torch.no_grad():
            conv.weight = nn.Parameter(widen_stem(conv.weight.detach()))
        conv.in_channels = 4
    return model


def _build_backbone(backbone: str, in_chans: int, pretrained: bool) -> nn.Module:
    """timm backbone without head or pooling; a pretrained RGB stem widened to RGBY."""
    if pretrained and in_chans == 4:
        model = timm.create_model(backbone, pretrained=True, in_chans=3, num_classes=0, global_pool="")
        return widen_model_stem(model)
    return timm.create_model(backbone, pretrained=pretrained, in_chans=in_chans, num_classes=0, global_pool="")


# --------------------------------------------------------------------------- the model


class ClassMapModel(nn.Module):
    """What the kernel asks of a classifier: class maps of a normalised batch, and the meta
    that says how its input is made (:class:`PuzzleCAM`, :class:`FoldGroup`).

    Subclasses define :meth:`class_maps` and set ``num_classes`` and ``meta``.
    """

    num_classes: int
    meta: dict[str, Any]

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class maps ``F (B, num_classes, h, w)`` for a normalised ``(B, in_chans, H, W)`` batch."""
        raise NotImplementedError

    @property
    def data_config(self) -> dict[str, Any]:
        """What the inputs must look like, from :attr:`meta` (like timm's
        ``resolve_data_config(model=m)``): ``input`` (the input pipeline,
        :data:`hpa_kernel.stages.inputs.INPUT_PIPELINES`; ``"hpa_kernel"`` when the meta
        names none), ``image_size`` and ``crop_size`` (``None`` when the meta names none:
        the caller's size stands), ``mean``, ``std`` (RGBY defaults)."""
        meta = self.meta
        size, crop = meta.get("image_size"), meta.get("crop_size")
        return {
            "input": meta.get("input", DEFAULT_PIPELINE),
            "image_size": int(size) if size is not None else None,
            "crop_size": int(crop) if crop is not None else None,
            "mean": tuple(meta.get("mean", RGBY_MEAN)),
            "std": tuple(meta.get("std", RGBY_STD)),
        }

    @property
    def input_pipeline(self) -> str:
        """The name of the input pipeline this model was trained with (``data_config["input"]``)."""
        return self.data_config["input"]

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), F (B, C, h, w))`` from one backbone pass."""
        maps = self.class_maps(x)
        return maps.mean(dim=(2, 3)), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` = global average of the class maps."""
        return self.class_maps(x).mean(dim=(2, 3))

    @staticmethod
    def cams(maps: torch.Tensor, norm: str = "relu_max") -> torch.Tensor:
        """CAMs in [0, 1] of class maps ``F`` (any leading dims), float32.

        ``norm="relu_max"`` (the reference, the team's ``make_cam`` exactly):
        ``relu(relu(F) - 1e-5) / (per-class spatial max of relu(F) + 1e-5)``.
        ``norm="minmax"``: ``(F - min F) / (max F - min F)`` per class; a flat map gives 1
        everywhere (nothing says which cells show the class, so Step 1 gives every cell
        the image probability).
        """
        f = maps.float()
        if norm == "relu_max":
            r = F.relu(f)
            return F.relu(r - CAM_EPS) / (r.amax(dim=(-2, -1), keepdim=True) + CAM_EPS)
        if norm == "minmax":
            r = f - f.amin(dim=(-2, -1), keepdim=True)
            span = r.amax(dim=(-2, -1), keepdim=True)
            return torch.where(span > 0, r / torch.where(span > 0, span, 1.0), 1.0)
        raise ValueError(f"unknown CAM normalisation {norm!r}; choose from {', '.join(CAM_NORMS)}")


class PuzzleCAM(ClassMapModel):
    """timm backbone + bias-free 1×1 conv classifier producing class maps.

    Args:
        backbone: any timm model name with 4-D (NCHW) feature maps (e.g. ``seresnext50_32x4d``).
        num_classes: number of classes (19).
        in_chans: input channels (4 = RGBY).
        pretrained: load timm's pretrained weights (a 3-channel stem is widened).
    """

    def __init__(self, backbone: str, num_classes: int = NUM_CLASSES, in_chans: int = 4, pretrained: bool = False):
        super().__init__()
        self.backbone_name = backbone
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.encoder = _build_backbone(backbone, self.in_chans, pretrained)
        self.num_features = int(self.encoder.num_features)
        self.classifier = nn.Conv2d(self.num_features, self.num_classes, kernel_size=1, bias=False)
        #: the checkpoint's meta (:func:`load_checkpoint`; empty for a model built here),
        #: like timm's ``pretrained_cfg``: the one record of sizes, normalisation and input pipeline
        self.meta: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature maps ``(B, C, h, w)``."""
        f = self.encoder(x)
        if f.ndim != 4:
            raise ValueError(f"backbone {self.backbone_name!r} gives {f.ndim}-D features; Puzzle-CAM needs maps")
        if f.shape[1] != self.num_features and f.shape[-1] == self.num_features:
            f = f.permute(0, 3, 1, 2)  # NHWC backbones (e.g. some transformers)
        return f

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class maps ``F (B, num_classes, h, w)`` for a normalised ``(B, in_chans, H, W)`` batch."""
        return self.classifier(self.features(x))


class FoldGroup(ClassMapModel):
    """Several folds of one recipe as one classifier, averaged the team's way
    (``hpa_oof.Ensemble`` of MPWARE-TEAM/HPA2021): the folds' class maps (and so their
    logits, the maps' global average) are averaged, then the sigmoid and the CAM are
    taken; Step 2's crop probabilities come from the averaged logits.

    The folds must share ``data_config`` (input pipeline, sizes, mean, std) and the number
    of classes; the group's :attr:`meta` is the first fold's plus ``folds`` (their count).
    """

    def __init__(self, models: Sequence[ClassMapModel]):
        super().__init__()
        if not models:
            raise ValueError("a fold group needs at least one model")
        first = models[0]
        for k, m in enumerate(models[1:], start=1):
            if m.data_config != first.data_config or m.num_classes != first.num_classes:
                raise CheckpointError(
                    f"fold group: fold {k} is fed differently from fold 0 "
                    f"({m.data_config} vs {first.data_config}); one group is one recipe"
                )
        self.folds = nn.ModuleList(models)
        self.num_classes = first.num_classes
        self.backbone_name = getattr(first, "backbone_name", "")
        self.meta = dict(first.meta, folds=len(models))

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the folds' class maps ``(B, num_classes, h, w)``."""
        maps = self.folds[0].class_maps(x)
        for fold in self.folds[1:]:
            maps = maps + fold.class_maps(x)
        return maps / len(self.folds)


# --------------------------------------------------------------------------- helpers


def normalize(x, mean: Sequence[float] = RGBY_MEAN, std: Sequence[float] = RGBY_STD):
    """``(x - mean) / std`` per channel for x in [0, 1].

    ``x``: channels-last numpy ``(..., C)`` (returns float32 numpy) or a torch tensor
    ``(B, C, H, W)`` / ``(C, H, W)`` (returns a float tensor on the same device).
    """
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        return (x.float() - m) / s
    x = np.asarray(x, dtype=np.float32)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


_FLIPS = {"none": (), "h": (3,), "v": (2,), "hv": (2, 3)}
#: The kernel's flip TTA views (``--tta``), for the full image and the cell crops alike.
TTA_FLIPS: tuple[str, ...] = ("none", "h", "v")


def flip_views(x: torch.Tensor, flips: Sequence[str] = TTA_FLIPS) -> list[torch.Tensor]:
    """``x`` (``(B, C, H, W)``) under each flip: ``"none"``, ``"h"`` (horizontal), ``"v"``, ``"hv"``."""
    if not flips:
        raise ValueError("TTA needs at least one view")
    return [x.flip(_FLIPS[f]) if _FLIPS[f] else x for f in flips]


def forward_tta(model: ClassMapModel, x: torch.Tensor, flips: Sequence[str] = TTA_FLIPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip TTA of the full image: average logits and *un-flipped* class maps over the views.

    All views run as one batch (``len(flips)``× memory). Returns ``(logits (B, C), F (B, C,
    h, w))``; the maps line up with the input image (Step 1 needs them), so the average is
    taken before the sigmoid. Cell crops average probabilities instead
    (:func:`hpa_kernel.stages.step2.predict_crops`).
    """
    views = flip_views(x, flips)
    _, maps = model.forward_with_maps(torch.cat(views, dim=0))
    maps = [m.flip(_FLIPS[f]) if _FLIPS[f] else m for m, f in zip(maps.split(x.shape[0], dim=0), flips)]
    mean_maps = torch.stack(maps, dim=0).mean(dim=0)
    return mean_maps.mean(dim=(2, 3)), mean_maps


def classify_image(
    model: ClassMapModel,
    image: np.ndarray,
    device: str | torch.device = "cpu",
    fp16: bool = False,
    tta: bool = False,
    cam_norm: str = "relu_max",
) -> tuple[np.ndarray, np.ndarray]:
    """The full-image forward of the kernel: ``(probs (C,), cams (C, h, w))`` as numpy.

    ``image`` is the ``(S, S, 4)`` float image in [0, 1]; it is resized (``INTER_AREA``) to
    the checkpoint's ``image_size`` and normalised with its mean/std
    (:attr:`PuzzleCAM.data_config`). ``fp16`` autocast only on CUDA; ``tta`` averages flips
    (:func:`forward_tta`). CAMs are :meth:`PuzzleCAM.cams` of the class maps under
    ``cam_norm`` (:data:`CAM_NORMS`).
    """
    import cv2

    cfg = model.data_config
    size = cfg["image_size"] or image.shape[0]
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = normalize(image, cfg["mean"], cfg["std"])
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(device)
    amp = bool(fp16) and torch.device(device).type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        logits, maps = forward_tta(model, x) if tta else model.forward_with_maps(x)
        cams = model.cams(maps.float(), cam_norm)
    return torch.sigmoid(logits.float())[0].cpu().numpy(), cams[0].cpu().numpy()


# --------------------------------------------------------------------------- checkpoints

_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain Python (numpy scalars/arrays and tuples converted), else TypeError."""
    if isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint meta {where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"checkpoint meta {where}: {type(value).__name__} is not a plain value (str/int/float/bool/list/dict)")


def save_checkpoint(model: PuzzleCAM, path: str | os.PathLike, half: bool = False, **meta: Any) -> Path:
    """Write ``{"state_dict", "meta"}`` to ``path`` (atomically) and return the path.

    ``meta`` gets ``backbone, num_classes, in_chans`` from the model and defaults
    ``image_size=512, crop_size=384, mean, std`` (RGBY), any of which ``meta`` overrides
    (except ``format``); extra keys (``fold``, ``score``...) are kept. Values must be plain
    (str, int, float, bool, None, lists, dicts; numpy scalars/arrays are converted). ``half=True`` stores floating tensors as
    fp16 (half the size; loading gives float32 again).
    """
    path = Path(path)
    full: dict[str, Any] = {
        "backbone": model.backbone_name,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "image_size": 512,
        "crop_size": 384,
        "mean": list(RGBY_MEAN),
        "std": list(RGBY_STD),
    }
    full.update({k: v for k, v in model.meta.items() if k not in full and k != "format"})
    full.update(meta)
    full.setdefault("input", DEFAULT_PIPELINE)
    full["format"] = CHECKPOINT_FORMAT
    full = _plain(full, "meta")
    full["mean"], full["std"] = [float(v) for v in full["mean"]], [float(v) for v in full["std"]]
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state, "meta": full}, tmp)
    os.replace(tmp, path)
    return path


_REQUIRED_META = ("backbone", "num_classes", "in_chans", "image_size", "crop_size", "mean", "std")
#: the input channels the kernel feeds a classifier (R, G, B, Y)
KERNEL_IN_CHANS = 4


def _meta_problem(meta: dict[str, Any], num_classes: int) -> str | None:
    """What in a checkpoint's meta the kernel cannot use, in words; ``None`` if it fits."""

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        return f"checkpoint meta lacks {', '.join(missing)}"
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        return f"backbone {meta['backbone']!r} is not a timm model name"
    if not integer(meta["num_classes"]) or meta["num_classes"] != num_classes:
        return f"num_classes is {meta['num_classes']!r}, the kernel needs {num_classes}"
    if not integer(meta["in_chans"]) or meta["in_chans"] != KERNEL_IN_CHANS:
        return f"in_chans is {meta['in_chans']!r}, the kernel feeds {KERNEL_IN_CHANS} (RGBY)"
    for key in ("image_size", "crop_size"):
        v = meta[key]
        if v is not None and not (integer(v) and v > 0):
            return f"{key} is {v!r}, not a positive integer"
    if meta["crop_size"] is not None and meta["crop_size"] > MAX_CROP_SIZE:
        return f"crop_size {meta['crop_size']} is over the kernel's bound of {MAX_CROP_SIZE}"
    for key in ("mean", "std"):
        v = meta[key]
        ok = isinstance(v, (list, tuple)) and len(v) == KERNEL_IN_CHANS and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v
        )
        if not ok:
            return f"{key} is {v!r}, not {KERNEL_IN_CHANS} finite numbers (one per RGBY channel)"
    if any(x <= 0 for x in meta["std"]):
        return f"std {meta['std']!r} has a value <= 0"
    if meta.get("input", DEFAULT_PIPELINE) not in INPUT_PIPELINES:
        return f"input pipeline {meta['input']!r} is not one of {', '.join(INPUT_PIPELINES)}"
    return None


def check_meta(meta: Any, path: str | os.PathLike = "checkpoint", num_classes: int = NUM_CLASSES) -> None:
    """Check a checkpoint's meta against what the kernel needs, before any weight is used.

    The kernel needs: the :data:`CHECKPOINT_FORMAT`, every key of ``save_checkpoint``'s meta,
    ``num_classes == 19`` (``num_classes``), ``in_chans == 4``, ``image_size`` and
    ``crop_size`` positive integers (or ``None``: the manifest's size stands), ``mean`` and
    ``std`` four finite numbers each, every ``std > 0``. Extra keys (``epoch``, ``fold``,
    ``dtype``...) are free. Raises :class:`CheckpointError` (one line naming ``path`` and
    the first misfit); returns ``None`` when the meta fits.
    """
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not {CHECKPOINT_FORMAT!r}")
    problem = _meta_problem(meta, num_classes)
    if problem is not None:
        raise CheckpointError(f"{path}: meta values do not fit the kernel: {problem}")


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """One-line reason why ``torch.load(weights_only=True)`` failed on ``path``."""
    text = str(err)
    # "Unsupported global: GLOBAL m.f was not an allowed global" (torch <= 2.5 ...) or
    # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (2.14)
    glob = re.search(r"GLOBAL\s+([\w.]*\w)", text)
    if "pytorch_zoo" in text:
        return CheckpointError(
            f"{path}: a pickled hpacellseg segmentation network (pytorch_zoo DPN U-Net), not a Puzzle-CAM checkpoint"
        )
    if glob:
        return CheckpointError(
            f"{path}: refused, it pickles Python objects beyond tensors and plain containers (global {glob.group(1)})"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    first = detail.group(1) if detail else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first[:160]})")


def read_weights(path: str | os.PathLike) -> Any:
    """The object a torch file holds, read with ``torch.load(weights_only=True)`` on the CPU
    (tensors saved on a GPU included): a weight file never runs code. A missing file or
    one torch refuses is a :class:`CheckpointError` with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear refusal
        raise _refusal(path, e) from None


def build_model(
    meta: dict[str, Any], state: Any, path: str | os.PathLike, device: str | torch.device = "cpu"
) -> PuzzleCAM:
    """A :class:`PuzzleCAM` built from a checked ``meta`` (:func:`check_meta`) with ``state``
    loaded strictly: in eval mode, float32, on ``device``, carrying ``meta``. A state that
    is not a dict of tensors, an unknown backbone, a missing or unexpected key or a shape
    that does not fit is a :class:`CheckpointError` naming ``path``."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict of tensors")
    try:
        model = PuzzleCAM(str(meta["backbone"]), int(meta["num_classes"]), int(meta["in_chans"]), pretrained=False)
    except Exception as e:  # noqa: BLE001 - unknown timm name and the like
        raise CheckpointError(f"{path}: cannot build backbone {meta['backbone']!r} ({type(e).__name__}: {e})") from None
    try:
        result = model.load_state_dict(state, strict=False)  # copy_ casts fp16 weights to the fp32 model
    except RuntimeError as e:  # shape mismatches
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"{path}: weights do not fit {meta['backbone']!r} ({detail[:200]})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not fit {meta['backbone']!r} "
            f"({len(result.missing_keys)} missing, e.g. {result.missing_keys[:2]}; "
            f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})"
        )
    model = model.eval().to(device)
    model.meta = dict(meta)
    return model


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", num_classes: int = NUM_CLASSES
) -> tuple[PuzzleCAM, dict[str, Any]]:
    """Rebuild a :class:`PuzzleCAM` from a :func:`save_checkpoint` file, from its meta alone.

    The meta is checked first (:func:`check_meta`: ``num_classes`` classes, 4 channels,
    sizes, mean/std, input pipeline), so a checkpoint that loads but would fail on every
    image is refused here, by name, not image by image.

    Reads with :func:`read_weights`; returns ``(model, meta)`` with the model in eval mode,
    float32, on ``device`` (:func:`build_model`); ``meta`` is ``model.meta`` (the model
    carries it). Anything else (missing file, random bytes, a pickle naming arbitrary
    globals, a segmentation U-Net file, a plain state dict without meta -- the
    third-place team's files are such, see :mod:`hpa_kernel.stages.mpware` --, a mismatched
    state dict) raises :class:`CheckpointError` with a one-line message naming the file.
    """
    path = Path(path)
    obj = read_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a Puzzle-CAM checkpoint (holds a {type(obj).__name__}, not a dict)")
    if "meta" not in obj or "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            team = any(f".{k}".endswith(".mclassifier.weight") for k in obj)
            hint = (
                'the third-place team\'s format: name it with "format": "mpware" in the manifest '
                "or convert it with python -m hpa_kernel.tools.import_checkpoint"
                if team else "write it with hpa_kernel.stages.model.save_checkpoint"
            )
            raise CheckpointError(f"{path}: a plain state dict without hpa_kernel metadata ({hint})")
        raise CheckpointError(f"{path}: not a Puzzle-CAM checkpoint (no 'state_dict' and 'meta' entries)")
    meta, state = obj["meta"], obj["state_dict"]
    check_meta(meta, path, num_classes)
    model = build_model(meta, state, path, device)
    return model, model.meta
