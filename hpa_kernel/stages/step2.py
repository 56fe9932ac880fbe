"""Step 2 — cell crops through the same classifier (DESIGN.md 2.4).

Each cell's bounding box in the 512 image is padded to a centred square (zeros beyond the
image), resized to ``crop_size`` (384) and classified by the Puzzle-CAM model in batches;
sigmoid gives per-cell class probabilities.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.stages.model import RGBY_MEAN, RGBY_STD, normalize
from hpa_kernel.stages.labels import label_boxes

__all__ = ["square_boxes", "crop_cells", "predict_crops"]


def square_boxes(boxes: np.ndarray) -> np.ndarray:
    """Pad ``(y0, x0, y1, x1)`` boxes to centred squares (side = the longer side).

    The extra rows/columns are split evenly, the odd one going after the box. The result
    may reach beyond the image; :func:`crop_cells` zero-pads there.
    """
    boxes = np.asarray(boxes, dtype=np.int64)
    h = boxes[:, 2] - boxes[:, 0]
    w = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(h, w)
    y0 = boxes[:, 0] - (side - h) // 2
    x0 = boxes[:, 1] - (side - w) // 2
    return np.stack([y0, x0, y0 + side, x0 + side], axis=1)


def crop_cells(
    image: np.ndarray,
    labels: np.ndarray,
    cell_ids: np.ndarray,
    crop_size: int = 384,
) -> np.ndarray:
    """Square crops of every cell, ``(n, C, crop_size, crop_size)`` float32.

    Args:
        image: ``(S, S, C)`` float32 in [0, 1] (the 512 RGBY image; any H×W works).
        labels: ``(S, S)`` label image of the same size.
        cell_ids: the cells to crop, in output order.
        crop_size: output side.

    Each crop is the cell's bounding box padded to a centred square (zeros beyond the
    image), resized with ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when
    enlarging. A cell without pixels gives an all-zero crop.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} do not match")
    cell_ids = np.asarray(cell_ids, dtype=np.int64).reshape(-1)
    H, W, C = image.shape
    out = np.zeros((len(cell_ids), C, crop_size, crop_size), dtype=np.float32)
    squares = square_boxes(label_boxes(labels, cell_ids))
    for i, (y0, x0, y1, x1) in enumerate(squares):  # per cell, bbox-sized work
        side = int(y1 - y0)
        if side <= 0:
            continue
        patch = np.zeros((side, side, C), dtype=np.float32)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        interp = cv2.INTER_AREA if side > crop_size else cv2.INTER_LINEAR
        r = cv2.resize(patch, (crop_size, crop_size), interpolation=interp)
        out[i] = r.reshape(crop_size, crop_size, C).transpose(2, 0, 1)
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def predict_crops(
    model: torch.nn.Module,
    crops: np.ndarray,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    fp16: bool = False,
) -> np.ndarray:
    """Sigmoid class probabilities ``(n, num_classes)`` float32 for ``(n, C, s, s)`` crops in [0, 1].

    Crops are normalised with ``mean``/``std`` (default: ``model.meta``'s, else RGBY),
    sent to ``device`` (default: the model's) ``batch_size`` at a time, under
    ``torch.inference_mode``; ``fp16`` autocast is used only on CUDA. Zero crops give
    ``(0, num_classes)``. The model must already be on ``device`` and in eval mode.
    """
    meta = getattr(model, "meta", {}) or {}
    mean = tuple(mean if mean is not None else meta.get("mean", RGBY_MEAN))
    std = tuple(std if std is not None else meta.get("std", RGBY_STD))
    num_classes = int(getattr(model, "num_classes", NUM_CLASSES))
    device = torch.device(device) if device is not None else _model_device(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    n = len(crops)
    out = np.zeros((n, num_classes), dtype=np.float32)
    use_amp = bool(fp16) and device.type == "cuda"
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            x = torch.as_tensor(np.asarray(crops[s : s + batch_size], dtype=np.float32)).to(device, non_blocking=True)
            x = normalize(x, mean, std)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(x)
            out[s : s + len(x)] = torch.sigmoid(logits.float()).cpu().numpy()
    return out
