"""Step 2 — cell crops through the same classifier (``docs/METHOD.md``, "Step 2").

Each cell's bounding box in the 512 image is padded to a centred square (zeros beyond the
image), resized to ``crop_size`` (384) and classified by the Puzzle-CAM model in batches;
sigmoid gives per-cell class probabilities.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import cv2
import numpy as np
import torch

from hpa_kernel.stages.model import MAX_CROP_SIZE, TTA_FLIPS, ClassMapModel, flip_views, normalize
from hpa_kernel.stages.labels import label_boxes

__all__ = ["MAX_CROP_SIZE", "square_boxes", "crop_cells", "crop_batches", "predict_crops"]


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


def _cut(image: np.ndarray, squares: np.ndarray, crop_size: int) -> np.ndarray:
    """The crops of ``squares`` (``(k, 4)`` y0, x0, y1, x1; may reach past the image:
    zeros there), ``(k, C, crop_size, crop_size)`` float32."""
    H, W, C = image.shape
    out = np.zeros((len(squares), C, crop_size, crop_size), dtype=np.float32)
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


def _squares(image: np.ndarray, labels: np.ndarray, cell_ids: np.ndarray, crop_size: int) -> np.ndarray:
    if image.ndim != 3 or image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} do not match")
    if not 1 <= int(crop_size) <= MAX_CROP_SIZE:
        raise ValueError(f"crop_size must be in 1..{MAX_CROP_SIZE}, not {crop_size}")
    return square_boxes(label_boxes(labels, np.asarray(cell_ids, dtype=np.int64).reshape(-1)))


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
        crop_size: output side, 1..:data:`MAX_CROP_SIZE`.

    Each crop is the cell's bounding box padded to a centred square (zeros beyond the
    image), resized with ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR`` when
    enlarging. A cell without pixels gives an all-zero crop. All ``n`` crops are held at
    once: the kernel cuts them batch by batch instead (:func:`crop_batches`).
    """
    image = np.asarray(image, dtype=np.float32)
    return _cut(image, _squares(image, labels, cell_ids, crop_size), int(crop_size))


def crop_batches(
    image: np.ndarray,
    labels: np.ndarray,
    cell_ids: np.ndarray,
    crop_size: int = 384,
    batch_size: int = 16,
) -> Iterator[np.ndarray]:
    """:func:`crop_cells` cut ``batch_size`` cells at a time: yields ``(<= batch_size, C,
    crop_size, crop_size)`` arrays in ``cell_ids`` order, the boxes found once. Memory is
    bounded by the batch, not by the number of cells."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    image = np.asarray(image, dtype=np.float32)
    squares = _squares(image, labels, cell_ids, crop_size)
    for s in range(0, len(squares), batch_size):
        yield _cut(image, squares[s : s + batch_size], int(crop_size))


def predict_crops(
    model: ClassMapModel,
    crops: np.ndarray,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    fp16: bool = False,
    tta: bool = False,
) -> np.ndarray:
    """Sigmoid class probabilities ``(n, num_classes)`` float32 for ``(n, C, s, s)`` crops in [0, 1].

    Crops are normalised with ``mean``/``std`` (default: the checkpoint's,
    :attr:`PuzzleCAM.data_config`), sent to ``device`` (default: the model's) ``batch_size`` at a time, under
    ``torch.inference_mode``; ``fp16`` autocast is used only on CUDA. ``tta`` averages the
    probabilities of the flipped crops (:data:`hpa_kernel.stages.model.TTA_FLIPS`). Zero
    crops give ``(0, num_classes)``. The model must already be on ``device`` and in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    cfg = model.data_config
    mean = tuple(mean) if mean is not None else cfg["mean"]
    std = tuple(std) if std is not None else cfg["std"]
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    device = torch.device(device)
    use_amp = bool(fp16) and device.type == "cuda"
    crops = torch.as_tensor(np.asarray(crops, dtype=np.float32))
    views = flip_views(crops, TTA_FLIPS if tta else ("none",))
    out = np.zeros((len(views), len(crops), model.num_classes), dtype=np.float32)
    with torch.inference_mode():
        for v, view in enumerate(views):
            for s in range(0, len(crops), batch_size):
                x = normalize(view[s : s + batch_size].to(device, non_blocking=True), mean, std)
                with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                    logits = model(x)
                out[v, s : s + len(x)] = torch.sigmoid(logits.float()).cpu().numpy()
    mean = out[0]
    for more in out[1:]:  # ((a + b) + c) / 3: the views in order
        mean = mean + more
    return mean / len(views) if len(views) > 1 else mean
