"""Overlay pictures: the RGB composite with cell outlines coloured by each cell's top class."""

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


def render_overlay(image: np.ndarray, labels: np.ndarray, cell_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The overlay as a uint8 RGB array at the label image's size.

    Each cell's outline takes the colour of its highest-scoring class and the class
    name is written at the cell's centre.
    """
    rgb = composite(image)
    if rgb.shape[:2] != labels.shape:
        rgb = cv2.resize(rgb, labels.shape[::-1], interpolation=cv2.INTER_AREA)
    if len(cell_ids) == 0:
        return rgb
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
    for cid, (cy, cx) in zip(cell_ids, centres):
        c = top[cid]
        if c < 0:
            continue
        name = CLASS_NAMES[c]
        color = tuple(int(v) for v in palette[c])
        cv2.putText(rgb, name[:18], (int(cx) - 30, int(cy)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1, cv2.LINE_AA)
    return rgb


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
