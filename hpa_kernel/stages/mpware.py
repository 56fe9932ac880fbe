"""The third-place team's checkpoints (MPWARE-TEAM/HPA2021), read as they are.

Their trainer saves ``torch.save(model.state_dict(), ".../model_best.pt")``: a plain dict of
fp32 tensors, no metadata, often saved on a GPU. The model is an ``HPASiameseModel``
(keys ``cnn1.mfeatures.<timm backbone keys>`` and ``cnn1.mclassifier.weight``, a bias-free
1x1 conv ``(19, C, 1, 1)``), a plain ``HPAModel`` (``mfeatures.`` / ``mclassifier.``), or
either wrapped by ``DataParallel`` (``module.`` first). Its backbone is
``timm.create_model(name, num_classes=0, global_pool='')`` with a 4-channel stem: the same
structure as :class:`~hpa_kernel.stages.model.PuzzleCAM`, whose keys are ``encoder.`` and
``classifier.``.

What the file does not say comes from the team's run folder name, e.g.
``siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0/fold1/stage1/snapshots/model_best.pt``
= ``{mtype}_{backbone}_{image size}_{training crop}_{channels}_{fp16_}CV{folds}_v{version}``
(:func:`parse_run_name`), else from the caller (the manifest entry's ``backbone``,
``image_size``, ``crop_size``, or the import tool's flags). The model is fed the team's way:
meta ``"input": "mpware"`` (:func:`hpa_kernel.stages.inputs.mpware_pixels`), ImageNet
mean/std extended to RGBY; Step 2 crops 384 px unless said otherwise.

:func:`load_mpware` gives a ready :class:`~hpa_kernel.stages.model.PuzzleCAM` carrying that
meta; :func:`import_checkpoint` writes it as our self-describing checkpoint
(``python -m hpa_kernel.tools.import_checkpoint``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpa_kernel.stages.model import (
    CHECKPOINT_FORMAT,
    RGBY_MEAN,
    RGBY_STD,
    CheckpointError,
    PuzzleCAM,
    build_model,
    check_meta,
    read_weights,
    save_checkpoint,
)

__all__ = ["RUN_NAME", "TEAM_CROP_SIZE", "RunName", "parse_run_name", "team_state_dict", "load_mpware", "import_checkpoint"]

#: the team's run folder name: ``{mtype}_{backbone}_{image}_{crop}_{channels}_{fp16_}{CV4|FULL}_v{version}``
RUN_NAME = re.compile(
    r"^(?P<mtype>siamese|regular)_(?P<backbone>.+?)_(?P<image_size>\d+)_(?P<crop_size>\d+)_"
    r"(?P<channels>[A-Z]+)_(?:fp16_)?(?:CV\d+|FULL)_v[\w.]+$"
)
#: Step 2 crop side of the team's inference (``CENTER_PAD`` in their ``hpa_oof.py``)
TEAM_CROP_SIZE = 384


@dataclass(frozen=True)
class RunName:
    """What a team run folder's name says (:func:`parse_run_name`)."""

    folder: str
    mtype: str
    backbone: str
    image_size: int
    crop_size: int
    channels: str


def parse_run_name(path: str | os.PathLike) -> RunName | None:
    """The first folder above ``path`` (nearest first) named like a team run, parsed; ``None`` if none is."""
    for part in reversed(Path(path).parent.parts):
        m = RUN_NAME.match(part)
        if m:
            return RunName(part, m["mtype"], m["backbone"], int(m["image_size"]), int(m["crop_size"]), m["channels"])
    return None


def team_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The team's state dict with our key names (``encoder.`` / ``classifier.``).

    Takes each of their file shapes: siamese (``cnn1.``), plain, ``DataParallel``
    (``module.``). Strict: a key outside ``mfeatures.`` / ``mclassifier.`` is a
    :class:`CheckpointError` naming the file and the key.
    """
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj, dict) and "meta" in obj and "state_dict" in obj:
            raise CheckpointError(f'{path}: an hpa_kernel checkpoint, not a team file (drop "format": "mpware")')
        raise CheckpointError(f"{path}: not a team checkpoint (expected a plain state dict of tensors)")
    state = {}
    for name, value in obj.items():
        key = name
        for prefix in ("module.", "cnn1."):  # DataParallel, then the siamese wrapper
            key = key[len(prefix):] if key.startswith(prefix) else key
        head, _, rest = key.partition(".")
        if head == "mfeatures" and rest:
            state[f"encoder.{rest}"] = value
        elif key == "mclassifier.weight":
            state["classifier.weight"] = value
        else:
            raise CheckpointError(f"{path}: unexpected key {name!r} for a team model (mfeatures. / mclassifier.weight)")
    if "classifier.weight" not in state:
        raise CheckpointError(f"{path}: no mclassifier.weight: not a team Puzzle-CAM model")
    return state


def _setting(name: str, from_name: Any, given: Any, run: RunName | None, path: Path) -> Any:
    """One setting from the run folder's name or the caller; both given must agree."""
    if from_name is not None and given is not None and from_name != given:
        raise CheckpointError(f"{path}: {name} {given!r} given, but the run folder {run.folder} says {from_name!r}")
    return from_name if from_name is not None else given


def team_meta(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    backbone: str | None = None,
    image_size: int | None = None,
    crop_size: int | None = None,
) -> dict[str, Any]:
    """Our checkpoint meta for a team file: backbone and sizes from its run folder's name or
    the arguments (one line saying what is missing or disagrees), the team's input pipeline
    and normalisation, classes from the classifier's shape. Not yet checked (:func:`check_meta`)."""
    path = Path(path)
    run = parse_run_name(path)
    if run is not None and run.channels != "RGBY":
        raise CheckpointError(f"{path}: trained on {run.channels} ({run.folder}); the kernel feeds RGBY")
    backbone = _setting("backbone", run and run.backbone, backbone, run, path)
    image_size = _setting("image_size", run and run.image_size, image_size, run, path)
    crop_size = crop_size if crop_size is not None else (run.crop_size if run else TEAM_CROP_SIZE)
    missing = [n for n, v in (("backbone", backbone), ("image_size", image_size)) if v is None]
    if missing:
        raise CheckpointError(
            f"{path}: no team run folder name (like siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0) "
            f"above it, so give {' and '.join(missing)} (manifest entry keys, or --backbone / --image-size)"
        )
    weight = state["classifier.weight"]
    return {
        "format": CHECKPOINT_FORMAT,
        "backbone": str(backbone),
        "num_classes": int(weight.shape[0]),
        "in_chans": 4,
        "image_size": int(image_size),
        "crop_size": int(crop_size),
        "mean": list(RGBY_MEAN),
        "std": list(RGBY_STD),
        "input": "mpware",
        "source": f"mpware:{run.folder if run else path.name}",
    }


def load_mpware(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    backbone: str | None = None,
    image_size: int | None = None,
    crop_size: int | None = None,
) -> PuzzleCAM:
    """A team file as a ready :class:`~hpa_kernel.stages.model.PuzzleCAM` (eval, float32,
    on ``device``) carrying its meta (:func:`team_meta`), read with ``weights_only=True``.

    Refused with a :class:`CheckpointError` naming the file: not a plain state dict, a key
    that is not the team's, a missing setting, a backbone its weights do not fit (any
    missing or unexpected key, any shape).
    """
    path = Path(path)
    state = team_state_dict(read_weights(path), path)
    meta = team_meta(path, state, backbone, image_size, crop_size)
    check_meta(meta, path)
    return build_model(meta, state, path, device)


def import_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    backbone: str | None = None,
    image_size: int | None = None,
    crop_size: int | None = None,
) -> PuzzleCAM:
    """Convert a team file into our self-describing checkpoint at ``dst`` (fp32, atomic);
    returns the loaded model (:func:`load_mpware`)."""
    model = load_mpware(src, "cpu", backbone, image_size, crop_size)
    save_checkpoint(model, dst, **model.meta)
    return model
