"""The model a training run starts from: ImageNet weights from a local file, an earlier
stage's checkpoint, or random.

- :func:`build_model` makes the :class:`hpa_kernel.stages.model.PuzzleCAM`. With
  ``pretrained_file`` the timm backbone is created with
  ``pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file)`` (timm reads the
  local file and never the network), as the 3-channel ImageNet model, and its stem is
  widened to RGBY with the mean of the RGB filters as the 4th (:func:`hpa_kernel.stages.model.widen_model_stem`).
  The 1x1 classifier (no bias) is Kaiming-normal initialised in every case.
- :func:`load_stage_weights` loads the weights of an earlier stage (``best.pt`` written by
  :func:`hpa_kernel.stages.model.save_checkpoint`, or a ``last.pt``) into a fresh model:
  ``--init-from``, a new stage with a fresh optimiser and schedule.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

__all__ = ["PretrainedError", "build_model", "load_stage_weights"]

logger = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """A weight file to start from is missing or does not fit (one line naming it)."""


def build_model(backbone: str, num_classes: int = 19, pretrained_file: str | Path | None = None):
    """``(model, source)``: a 4-channel PuzzleCAM and a one-line description of its start."""
    import timm

    from hpa_kernel.stages.model import PuzzleCAM, widen_model_stem

    model = PuzzleCAM(backbone, num_classes=num_classes, in_chans=4, pretrained=False)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            from hpa_kernel.train.config import pretrained_hint

            raise PretrainedError(f"pretrained file {path} not found; {pretrained_hint(backbone, str(path))}")
        try:
            rgb = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                    in_chans=3, num_classes=0, global_pool="")
        except Exception as e:  # noqa: BLE001 - a wrong or corrupt file: one line naming it
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise PretrainedError(f"pretrained file {path} does not load into timm {backbone}: "
                                  f"{type(e).__name__}: {first}") from None
        model.encoder.load_state_dict(widen_model_stem(rgb).state_dict())
        hub = getattr(rgb, "pretrained_cfg", {}).get("hf_hub_id") or backbone
        source = f"ImageNet weights from {path} ({hub}), stem widened to RGBY (4th filter = mean of RGB)"
    else:
        source = "none: random init (pretrained false)"
    nn.init.kaiming_normal_(model.classifier.weight)
    return model, source


def load_stage_weights(model: nn.Module, path: str | Path) -> str:
    """Load an earlier stage's weights (``best.pt`` or ``last.pt``) into ``model``; returns a description."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"init_from: checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise PretrainedError(f"init_from: {path} is not a readable torch checkpoint ({type(e).__name__})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        state, meta = obj["state_dict"], obj.get("meta", {})
    elif isinstance(obj, dict) and "model" in obj:
        state, meta = obj["model"], obj.get("meta", {})
    else:
        raise PretrainedError(f"init_from: {path} holds neither a best.pt ('state_dict') nor a last.pt ('model')")
    want = getattr(model, "backbone_name", None)
    if meta.get("backbone") and want and meta["backbone"] != want:
        raise PretrainedError(f"init_from: {path} is a {meta['backbone']} model, the config trains {want}")
    try:
        model.load_state_dict(state)  # copy_ casts fp16 weights into the fp32 model
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise PretrainedError(f"init_from: {path} does not fit the model ({first[:200]})") from None
    return f"stage weights from {path}" + (f" (epoch {meta['epoch']})" if "epoch" in meta else "")
