"""The third-place team's model structure, input pipeline and CAM, re-created for the tests.

Written from reading MPWARE-TEAM/HPA2021 (``src/hpa_training.py``, ``src/hpa_oof.py``,
``src/hdf5_dump.py``), step by step as their code does it, and kept apart from the package:
the kernel's :mod:`hpa_kernel.stages.mpware` and ``"mpware"`` input pipeline are checked
against these, never the other way round.

* :class:`TeamModel` / :class:`TeamSiamese`: ``HPAModel`` / ``HPASiameseModel`` (a timm
  backbone without head or pooling, its stem conv replaced by a 4-channel one, a bias-free
  1x1 conv classifier; logits = global average of the class maps).
* :func:`team_input`: PIL-read planes as uint16, ``/65535`` or ``/255``, skimage resize,
  uint8 truncation, ``preprocess_input`` (``/255`` if max > 1), mean/std.
* :func:`team_make_cam`, :func:`team_ensemble` (``hpa_oof.Ensemble``: outputs averaged).
* :func:`randomize` (random weights and BatchNorm statistics), :func:`save_team_file` in
  each of their file shapes (siamese, plain, ``DataParallel``, saved on a GPU).
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np
import skimage.transform
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = [0.485, 0.456, 0.406, 0.485]
STD = [0.229, 0.224, 0.225, 0.229]
#: where each backbone family keeps its stem conv, as their ``HPAModel`` replaces it
#: (``resnet10t``, the fast tests' small backbone, keeps it in ``conv1[0]``)
STEM = {"seresnext": "conv1", "regnet": "stem.conv", "csp": "stem.0.conv", "resnet10t": "conv1.0"}


def _four_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """Their ``get_4channels_conv``: the RGB filters plus their mean as the 4th."""
    new = nn.Conv2d(4, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False)
    new.weight = nn.Parameter(torch.cat([conv.weight, conv.weight.mean(dim=1, keepdim=True)], dim=1))
    return new


class TeamModel(nn.Module):
    """``HPAModel``: ``mfeatures`` (timm, ``num_classes=0, global_pool=''``) + ``mclassifier``."""

    def __init__(self, backbone: str, num_classes: int = 19):
        super().__init__()
        self.mfeatures = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
        stem = next(v for k, v in STEM.items() if k in backbone)
        parent_name, _, leaf = stem.rpartition(".")
        parent = self.mfeatures.get_submodule(parent_name) if parent_name else self.mfeatures
        setattr(parent, leaf, _four_channel(parent.get_submodule(leaf)))
        channels = self.mfeatures.feature_info[-1]["num_chs"]
        self.mclassifier = nn.Conv2d(channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.mclassifier(self.mfeatures(x))
        logits = torch.mean(features.view(features.size(0), features.size(1), -1), -1)
        return {"logits": logits, "features": features}


class TeamSiamese(nn.Module):
    """``HPASiameseModel``: the same model as ``cnn1`` (the tiled pass is training only)."""

    def __init__(self, backbone: str, num_classes: int = 19):
        super().__init__()
        self.cnn1 = TeamModel(backbone, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.cnn1(x)
        return {"single_logits": out["logits"], "single_features": out["features"]}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (variance-keeping), random BatchNorm statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(1000)
    return model.eval()


def team_input(planes: list[np.ndarray], size: int = 512) -> torch.Tensor:
    """Their input, from the four planes as PIL reads them (R, G, B, Y): ``(1, 4, S, S)``."""
    stack = np.dstack([np.asarray(p).astype(np.uint16) for p in planes])
    img = (stack / 65535.0).astype(np.float32) if stack.max() > 255 else (stack / 255).astype(np.float32)
    img = skimage.transform.resize(img, (size, size), anti_aliasing=True)
    img = (255 * img).astype(np.uint8)
    x = img / 255.0 if img.max() > 1 else img  # preprocess_input, input_range [0, 1]
    x = (x - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(x.transpose(2, 0, 1).astype("float32"))[None]


def team_make_cam(x: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """Their ``make_cam`` on ``(B, C, h, w)`` class maps."""
    x = F.relu(x)
    b, c, h, w = x.size()
    max_value = x.view(b, c, h * w).max(axis=-1)[0].view((b, c, 1, 1))
    return F.relu(x - epsilon) / (max_value + epsilon)


def team_ensemble(models: list[nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``hpa_oof.Ensemble``: every output averaged over the models."""
    outs = [m(x) for m in models]
    return {k: torch.mean(torch.stack([o[k] for o in outs]), dim=0) for k in outs[0]}


def _cuda_tagged(data: bytes) -> bytes:
    """A torch zip file whose storages say ``cuda:0`` (as saved on a GPU), made on the CPU."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for name in src.namelist():
            blob = src.read(name)
            if name.endswith("data.pkl"):
                blob = blob.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(name, blob)
    return buf.getvalue()


def save_team_file(model: TeamSiamese, path: Path, shape: str = "siamese") -> Path:
    """``torch.save(model.state_dict(), path)`` in one of their shapes: ``"siamese"``,
    ``"plain"`` (an ``HPAModel``), ``"dataparallel"`` (``module.`` first), ``"cuda"``
    (siamese, storages tagged ``cuda:0``)."""
    if shape == "plain":
        state = model.cnn1.state_dict()
    elif shape == "dataparallel":
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
    else:
        state = model.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = _cuda_tagged(buf.getvalue()) if shape == "cuda" else buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
