"""Run the hpacellseg nuclei and cell U-Nets on a batch of RGBY images."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: hpacellseg input normalisation: ``(x - MEAN) / STD`` per channel, x in [0, 1].
MEAN = (124 / 255, 117 / 255, 104 / 255)
STD = (1 / (0.0167 * 255),) * 3
#: Both U-Nets need input sides that are multiples of this.
MULTIPLE = 32

# RGBY channel indices
_R, _G, _B, _Y = 0, 1, 2, 3


def _pad_amounts(size: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """(before, after) padding that brings ``size`` to a multiple of ``multiple``."""
    total = (-size) % multiple
    return total // 2, total - total // 2


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Reflection-pad a (B, C, H, W) tensor so H and W are multiples of ``multiple``.

    Returns the padded tensor and ``(top, bottom, left, right)``; the padding
    is split evenly on both sides. Sides too short to reflect are padded by
    replicating the edge.
    """
    h, w = x.shape[-2:]
    top, bottom = _pad_amounts(h, multiple)
    left, right = _pad_amounts(w, multiple)
    pads = (top, bottom, left, right)
    if not any(pads):
        return x, pads
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "replicate"
    return F.pad(x, (left, right, top, bottom), mode=mode), pads


def _run(model: nn.Module, x: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> softmax x 255 as uint8 (B, H, W, 3), padding handled."""
    h, w = x.shape[-2:]
    xp, (top, _, left, _) = pad_to_multiple(x)
    use_amp = fp16 and x.device.type == "cuda"
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=use_amp):
        logits = model(xp)
    logits = logits[..., top : top + h, left : left + w].float()
    probs = torch.softmax(logits, dim=1)
    # as skimage.util.img_as_ubyte in hpacellseg: round(p * 255)
    return torch.round(probs * 255.0).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def predict_hpa(
    nuc_model: nn.Module,
    cell_model: nn.Module,
    images: np.ndarray,
    device: str | torch.device = "cpu",
    fp16: bool = False,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cell network outputs for a batch of RGBY images.

    Parameters
    ----------
    nuc_model, cell_model : nn.Module
        The two U-Nets (already on ``device``); forward (B, 3, H, W)
        normalised -> raw logits (B, 3, H, W). Put in eval mode here.
    images : (B, S, S, 4) or (S, S, 4) float32
        RGBY in [0, 1]. Any side length: inputs are reflection-padded to a
        multiple of 32 and the outputs cropped back.
    device : str or torch.device
    fp16 : bool
        float16 autocast, used on CUDA only (ignored on CPU).
    batch_size : int, optional
        Largest number of images per forward (default: all at once).

    Returns
    -------
    nuc, cell : (B, S, S, 3) uint8
        Softmax over (background, border, interior) x 255, rounded. The
        nuclei net sees the blue channel repeated 3 times, the cell net
        (red, yellow, blue).
    """
    images = np.asarray(images)
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 4:
        raise ValueError(f"images must be (B, H, W, 4) RGBY, got shape {images.shape}")
    device = torch.device(device)
    n = images.shape[0]
    step = n if not batch_size else max(1, int(batch_size))
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32, device=device)[:, None, None]
    nuc_model.eval()
    cell_model.eval()
    nuc_out, cell_out = [], []
    with torch.inference_mode():
        for start in range(0, n, step):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + step], dtype=np.float32))
            x = x.to(device).permute(0, 3, 1, 2)  # (b, 4, H, W)
            nuc_in = (x[:, [_B, _B, _B]] - mean) / std
            cell_in = (x[:, [_R, _Y, _B]] - mean) / std
            nuc_out.append(_run(nuc_model, nuc_in, fp16).cpu().numpy())
            cell_out.append(_run(cell_model, cell_in, fp16).cpu().numpy())
    nuc = np.concatenate(nuc_out) if nuc_out else np.zeros((0, *images.shape[1:3], 3), np.uint8)
    cell = np.concatenate(cell_out) if cell_out else np.zeros_like(nuc)
    logger.debug("predict_hpa: %d images of %s on %s (fp16=%s)", n, images.shape[1:3], device, fp16)
    if single:
        return nuc[0], cell[0]
    return nuc, cell
