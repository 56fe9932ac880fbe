"""Overlay pictures: the RGB composite with cell outlines coloured by each cell's top class,
each cell's top classes with their confidences, and a legend of the class colours."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES
from hpa_kernel.formats.atomic import atomic_write


def class_palette(n: int = NUM_CLASSES) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours, evenly spread hues (Negative = grey)."""
    hsv = np.zeros((1, n, 3), np.uint8)
    hsv[0, :, 0] = (np.arange(n) * 180 // n).astype(np.uint8)
    hsv[0, :, 1] = 200
    hsv[0, :, 2] = 255
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    rgb[n - 1] = (160, 160, 160)
    return rgb


def composite(image: np.ndarray) -> np.ndarray:
    """RGBY float (H, W, 4) in [0, 1] -> uint8 RGB as HPA shows it (yellow adds to R and G)."""
    r, g, b, y = (image[..., i] for i in range(4))
    rgb = np.stack([np.maximum(r, y * 0.8), np.maximum(g, y * 0.8), b], axis=-1)
    hi = np.percentile(rgb, 99.5) if rgb.size else 1.0
    return (np.clip(rgb / max(hi, 1e-6), 0, 1) * 255).astype(np.uint8)


def outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels on a cell's edge (label differs from a neighbour's)."""
    lab = labels.astype(np.int32, copy=False)
    edge = (ndi.grey_erosion(lab, size=3) != lab) | (ndi.grey_dilation(lab, size=3) != lab)
    return edge & (lab > 0)


#: classes per cell caption, and the legend's width in pixels
CAPTION_TOP = 2
LEGEND_WIDTH = 190
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def cell_caption(scores: np.ndarray, top: int = CAPTION_TOP) -> list[str]:
    """A cell's caption lines: its ``top`` classes above zero, best first, with confidences
    (``"Nucleoplasm 0.82"``); empty when the cell has no class."""
    order = np.argsort(-scores, kind="stable")[:top]
    return [f"{CLASS_NAMES[c][:16]} {scores[c]:.2f}" for c in order if scores[c] > 0]


def draw_text(rgb: np.ndarray, text: str, org: tuple[int, int], scale: float, color=(255, 255, 255)) -> None:
    """Text readable on any background: a dark outline under the letters."""
    cv2.putText(rgb, text, org, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(rgb, text, org, _FONT, scale, color, 1, cv2.LINE_AA)


def legend(height: int, classes: np.ndarray, width: int = LEGEND_WIDTH) -> np.ndarray:
    """A dark ``(height, width, 3)`` panel: a colour swatch and the name of each class in ``classes``."""
    panel = np.full((height, width, 3), 24, np.uint8)
    palette = class_palette()
    draw_text(panel, "top class colours", (6, 16), 0.42)
    step = max(12, min(22, (height - 28) // max(len(classes), 1)))
    for k, c in enumerate(classes):
        y = 28 + k * step
        if y + 10 > height:
            draw_text(panel, f"+{len(classes) - k} more", (6, y + 9), 0.35)
            break
        panel[y : y + 10, 6:22] = palette[c]
        draw_text(panel, f"{c} {CLASS_NAMES[c][:22]}", (28, y + 9), 0.35)
    return panel


def render_overlay(image: np.ndarray, labels: np.ndarray, cell_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The overlay as a uint8 RGB array: the label image's size plus a legend on the right.

    Each cell's outline takes the colour of its highest-scoring class; its caption (at the
    cell's centre, white on a dark outline so it reads on any colour) names its top
    :data:`CAPTION_TOP` classes with their confidences. The legend names the colour of
    every class that is some cell's top class.
    """
    rgb = composite(image)
    if rgb.shape[:2] != labels.shape:
        rgb = cv2.resize(rgb, labels.shape[::-1], interpolation=cv2.INTER_AREA)
    if len(cell_ids) == 0:
        return np.concatenate([rgb, legend(rgb.shape[0], np.array([], int))], axis=1)
    palette = class_palette()
    top = np.full(int(labels.max()) + 1, -1, np.int64)
    has = scores.max(axis=1) > 0
    top[cell_ids[has]] = scores[has].argmax(axis=1)
    edge = outlines(labels)
    cls = top[labels[edge]]
    ok = cls >= 0
    rows, cols = np.nonzero(edge)
    rgb[rows[ok], cols[ok]] = palette[cls[ok]]
    rgb[rows[~ok], cols[~ok]] = (255, 255, 255)
    centres = ndi.center_of_mass(np.ones_like(labels), labels, cell_ids)
    scale = float(np.clip(labels.shape[1] / 1200.0, 0.4, 0.8))
    for i, (cid, (cy, cx)) in enumerate(zip(cell_ids, centres)):
        if top[cid] < 0 or not np.isfinite(cy):
            continue
        for k, line in enumerate(cell_caption(scores[i])):
            draw_text(rgb, line, (int(cx) - 30, int(cy) + int(k * 26 * scale)), scale,
                      (255, 255, 255) if k == 0 else (200, 200, 200))
    shown = np.unique(top[cell_ids][top[cell_ids] >= 0])
    return np.concatenate([rgb, legend(rgb.shape[0], shown)], axis=1)


def save_overlay(path: Path, image: np.ndarray, labels: np.ndarray, cell_ids: np.ndarray, scores: np.ndarray) -> Path:
    """Write :func:`render_overlay` as a PNG (folders created), atomically
    (:func:`~hpa_kernel.formats.atomic.atomic_write`: a link or FIFO at ``path`` is replaced,
    never followed or waited on)."""
    path = Path(path)
    rgb = render_overlay(image, labels, cell_ids, scores)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode overlay {path}")
    return atomic_write(path, png.tobytes())
