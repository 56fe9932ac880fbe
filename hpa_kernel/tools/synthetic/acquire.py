"""The camera: a smooth noise field, and optics blur, background, shot and read noise and
quantisation of a painted float image (the acquisition model).

:func:`smooth_noise` is also the texture source of the pattern painters
(:mod:`~hpa_kernel.tools.synthetic.patterns`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], corr: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length ``corr`` px.

    White noise on a coarse grid (spacing ``corr/2``), lightly blurred and upsampled
    bicubically: cheap even for large crops.
    """
    h, w = shape
    step = max(corr / 2.0, 1.0)
    gh, gw = int(math.ceil(h / step)) + 4, int(math.ceil(w / step)) + 4
    low = rng.standard_normal((gh, gw), dtype=np.float32)
    low = cv2.GaussianBlur(low, (0, 0), 0.8)
    up = cv2.resize(low, (int(round(gw * step)), int(round(gh * step))), interpolation=cv2.INTER_CUBIC)
    off = int(step)
    up = up[off : off + h, off : off + w]
    if up.shape != (h, w):  # rounding at tiny sizes
        up = cv2.resize(up, (w, h), interpolation=cv2.INTER_LINEAR)
    # normalised with the coarse grid's statistics: cheap, and the same for every crop
    sd = float(low.std())
    return (up - float(low.mean())) * np.float32(1.0 / (sd if sd > 1e-6 else 1.0))


def acquire(rng: np.random.Generator, img: np.ndarray, depth: int, s: float) -> np.ndarray:
    """Optics blur, background, shot and read noise, quantisation of (H, W, 4) float."""
    h, w, _ = img.shape
    img = cv2.GaussianBlur(img, (0, 0), max(1.2 * s, 0.5))
    bg_level = rng.uniform(0.01, 0.04, 4).astype(np.float32)
    vignette = 1.0 + 0.25 * smooth_noise(rng, (h, w), 500.0 * s)
    img += bg_level * vignette[..., None]
    gain = np.float32(rng.uniform(0.01, 0.02))
    sd = cv2.sqrt(np.maximum(img, 0, out=img))
    sd *= gain
    sd += np.float32(0.004)
    # triangular noise of unit variance (sum of two uniform bytes): close enough to
    # Gaussian and much cheaper to draw
    noise = rng.integers(0, 256, img.shape, dtype=np.uint8).astype(np.float32)
    noise += rng.integers(0, 256, img.shape, dtype=np.uint8)
    noise -= np.float32(255.0)
    noise *= np.float32(1.0 / 104.5)
    sd *= noise
    img += sd
    maxval = np.float32(255.0 if depth == 8 else 65535.0)
    img *= maxval
    img += np.float32(0.5)
    np.clip(img, 0.0, maxval, out=img)
    return img.astype(np.uint8 if depth == 8 else np.uint16)
