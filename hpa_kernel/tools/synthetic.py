"""Synthetic HPA-like images with per-cell ground truth.

The generator draws a field of irregular, touching cells around nuclei and paints the
four HPA channels: red = microtubules, green = the protein of interest (each cell its own
classes), blue = nuclei, yellow = endoplasmic reticulum. Every cell knows its classes, so
the images serve as ground truth for the segmentation, the kernel and the metric.

All lengths are defined on a 2048 px reference field of view and scaled with the image
size, so a 512 px and a 2048 px image show the same field (cells about 4x smaller), like
the real HPA images of different cameras. Per-cell work happens on bounding-box crops.

Public API
----------
- :func:`make_image` -> :class:`SyntheticImage`
- :func:`write_dataset` -> a Kaggle-layout folder with per-cell truth
- :func:`sample_dataset` -> the small bundled sample set (generated on demand)
- CLI: ``python -m hpa_kernel.tools.synthetic --out DIR --images N --seed S``
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import cv2
import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES, format_labels
from hpa_kernel.formats.images import CHANNELS, channel_path
from hpa_kernel.formats.truth import write_label_image, write_truth_index

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticImage",
    "make_image",
    "write_dataset",
    "sample_dataset",
    "image_id",
    "main",
]

REF_SIDE = 2048.0
"""Side (px) of the reference field of view; every length below is in reference px."""

# Relative frequency of the 18 positive classes when drawing random image labels:
# roughly the square root of the HPA train-set frequencies, so that rare classes still
# appear in small synthetic sets.
_CLASS_WEIGHTS = np.array(
    [6.0, 2.0, 3.0, 2.2, 2.2, 2.2, 2.0, 3.0, 2.0, 1.8, 1.5, 1.0, 2.0, 2.5, 2.8, 1.0, 4.0, 2.8],
    dtype=float,
)

SizeSpec = Union[int, Sequence[int]]
DepthSpec = Union[int, str, Sequence[int]]


# --------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------
@dataclass
class SyntheticImage:
    """One synthetic image and its truth.

    Attributes
    ----------
    rgby : (H, W, 4) uint8 or uint16, channel order R, G, B, Y.
    cell_labels : (H, W) int32, 0 = background, cells 1..n consecutive.
    nuclei_labels : (H, W) int32, each nucleus carries the label of its cell.
    cell_classes : cell id -> sorted class ids (``[18]`` for a Negative cell).
    image_labels : sorted union of the cells' classes.
    """

    rgby: np.ndarray
    cell_labels: np.ndarray
    nuclei_labels: np.ndarray
    cell_classes: dict[int, list[int]]
    image_labels: list[int]

    @property
    def height(self) -> int:
        return int(self.rgby.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgby.shape[1])

    @property
    def cell_ids(self) -> np.ndarray:
        """The cell labels present, ascending (``1..n``)."""
        return np.arange(1, len(self.cell_classes) + 1)


# --------------------------------------------------------------------------------------
# Small array helpers
# --------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], corr: float) -> np.ndarray:
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


def _sample_points(rng: np.random.Generator, weight: np.ndarray, n: int) -> np.ndarray:
    """``n`` sub-pixel points (y, x) drawn with probability proportional to ``weight``."""
    flat = weight.ravel()
    nz = np.flatnonzero(flat > 0)
    if n <= 0 or nz.size == 0:
        return np.zeros((0, 2), np.float32)
    cdf = np.cumsum(flat[nz], dtype=np.float64)
    pick = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    idx = nz[np.minimum(pick, nz.size - 1)]
    yx = np.stack(np.unravel_index(idx, weight.shape), axis=1).astype(np.float32)
    return yx + rng.uniform(-0.5, 0.5, size=yx.shape).astype(np.float32)


def _spots(shape: tuple[int, int], pts: np.ndarray, amps: np.ndarray | float, sigma: float) -> np.ndarray:
    """Gaussian spots of peak ~``amps`` and width ``sigma`` at points (y, x)."""
    canvas = np.zeros(shape, np.float32)
    if len(pts) == 0:
        return canvas
    iy = np.clip(np.round(pts[:, 0]).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(pts[:, 1]).astype(int), 0, shape[1] - 1)
    np.add.at(canvas, (iy, ix), np.broadcast_to(np.asarray(amps, np.float32), (len(pts),)))
    sigma = max(float(sigma), 0.5)
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    return canvas * np.float32(2.0 * math.pi * sigma * sigma)


def _random_walks(
    rng: np.random.Generator,
    starts: np.ndarray,
    angles: np.ndarray,
    n_steps: int,
    step: float | np.ndarray,
    turn_sd: float,
) -> np.ndarray:
    """Curved paths (n, n_steps+1, 2) in (x, y) order from ``starts`` (y, x)."""
    n = len(starts)
    theta = angles[:, None] + np.cumsum(rng.normal(0.0, turn_sd, (n, n_steps)), axis=1)
    step = np.broadcast_to(np.asarray(step, float).reshape(-1, 1), (n, 1))
    dxy = np.stack([np.cos(theta), np.sin(theta)], axis=-1) * step[:, :, None]
    xy0 = starts[:, ::-1].astype(float)
    return np.concatenate([xy0[:, None, :], xy0[:, None, :] + np.cumsum(dxy, axis=1)], axis=1)


def _draw_paths(shape: tuple[int, int], paths: np.ndarray, thickness: int) -> np.ndarray:
    """Anti-aliased polylines (x, y paths) rasterised into a float32 [0, 1] canvas."""
    canvas = np.zeros(shape, np.uint8)
    if len(paths):
        pts = np.round(np.asarray(paths) * 4.0).astype(np.int32)  # shift=2: quarter pixels
        cv2.polylines(canvas, list(pts), False, 255, max(int(thickness), 1), cv2.LINE_AA, shift=2)
    return canvas.astype(np.float32) * np.float32(1.0 / 255.0)


def _distance_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest pixel outside the mask."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _distance_outside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel outside the mask to the mask (0 inside).

    Pixels beyond the crop count as outside, so the crop edge is not mistaken for the
    mask's edge.
    """
    padded = np.pad((~mask).astype(np.uint8), 1, constant_values=1)
    if not mask.any():
        return np.full(mask.shape, np.float32(1e6), np.float32)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _norm(a: np.ndarray, q: float = 99.5) -> np.ndarray:
    """Scale ``a`` so its ``q`` percentile of positive values is 1."""
    pos = a[a > 0]
    if pos.size == 0:
        return a
    ref = float(np.percentile(pos, q))
    return a / np.float32(ref if ref > 1e-9 else 1.0)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
@dataclass
class _Cell:
    """Geometry of one cell in padded-canvas coordinates (reference units scaled)."""

    y: float  # nucleus centre
    x: float
    inside: bool  # nucleus centre inside the image
    r: float  # mean cell radius (px)
    aniso: float  # cell elongation
    angle: float  # cell long-axis angle
    harm: np.ndarray  # (k, 3): order, amplitude, phase of the radial outline noise
    cy: float  # cell centre (offset from nucleus)
    cx: float
    rn: float  # nucleus mean radius
    n_aniso: float
    n_angle: float
    n_harm: np.ndarray
    mitotic: bool = False
    classes: list[int] = field(default_factory=list)


def _place_seeds(
    rng: np.random.Generator, height: int, width: int, n_in: int, margin: float, s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Dart-throwing seeds: ``n_in`` inside the image plus some in a border band.

    Returns (yx (m, 2), inside (m,) bool). The minimum spacing follows the density.
    """
    area = float(height * width)
    ext_area = (height + 2 * margin) * (width + 2 * margin)
    n_out = int(round(n_in * (ext_area - area) / area)) if n_in else 0
    spacing = 0.72 * math.sqrt(area / max(n_in, 1))
    spacing = min(spacing, 520.0 * s)
    spacing = max(spacing, 60.0 * s)
    pts: list[np.ndarray] = []
    inside: list[bool] = []
    n_inside = n_outside = 0
    for _attempt in range(30):
        cand = rng.uniform((-margin, -margin), (height + margin, width + margin), size=(40 * (n_in + n_out) + 50, 2))
        for p in cand:
            ins = 0 <= p[0] < height and 0 <= p[1] < width
            if (ins and n_inside >= n_in) or (not ins and n_outside >= n_out):
                continue
            if pts:
                d2 = ((np.asarray(pts) - p) ** 2).sum(axis=1)
                if d2.min() < spacing * spacing:
                    continue
            pts.append(p)
            inside.append(ins)
            n_inside += ins
            n_outside += not ins
            if n_inside >= n_in and n_outside >= n_out:
                break
        if n_inside >= n_in:
            break
        spacing *= 0.85  # too dense for this spacing: relax and keep throwing
    if not pts:
        return np.zeros((0, 2)), np.zeros(0, bool)
    return np.asarray(pts, float), np.asarray(inside, bool)


def _harmonics(rng: np.random.Generator, amp: float, orders: Iterable[int]) -> np.ndarray:
    """Radial outline noise: rows (order k, amplitude, phase), amplitude ~ 1/sqrt(k-1)."""
    rows = [(k, rng.uniform(0.3, 1.0) * amp / math.sqrt(max(k - 1, 1)), rng.uniform(0, 2 * math.pi)) for k in orders]
    return np.asarray(rows, float)


def _make_cells(rng: np.random.Generator, seeds: np.ndarray, inside: np.ndarray, s: float) -> list[_Cell]:
    """Random cell and nucleus shapes around the seeds (nucleus centre = seed)."""
    cells = []
    for (y, x), ins in zip(seeds, inside):
        r = rng.uniform(100.0, 210.0) * s
        aniso = rng.uniform(1.0, 1.7)
        angle = rng.uniform(0, math.pi)
        off = rng.uniform(0.0, 0.22) * r
        phi = rng.uniform(0, 2 * math.pi)
        rn = rng.uniform(0.30, 0.42) * r
        cells.append(
            _Cell(
                y=float(y),
                x=float(x),
                inside=bool(ins),
                r=r,
                aniso=aniso,
                angle=angle,
                harm=_harmonics(rng, 0.16, range(2, 6)),
                cy=float(y + off * math.sin(phi)),
                cx=float(x + off * math.cos(phi)),
                rn=rn,
                n_aniso=rng.uniform(1.0, 1.45),
                n_angle=angle + rng.normal(0, 0.3),
                n_harm=_harmonics(rng, 0.05, range(2, 5)),
            )
        )
    return cells


def _fit_nuclei(cells: list[_Cell]) -> None:
    """Shrink nuclei that could overlap a neighbour's (crowded images), in place."""
    if len(cells) < 2:
        return
    yx = np.array([(c.y, c.x) for c in cells])
    d = np.sqrt(((yx[:, None, :] - yx[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nearest = d.min(axis=1)
    for c, dist in zip(cells, nearest):
        # the outline reaches about 1.15 * rn * sqrt(n_aniso) from the centre
        c.rn = min(c.rn, 0.42 * dist / (1.15 * math.sqrt(c.n_aniso)))


def _radial_cost(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, aniso: float, angle: float, harm: np.ndarray
) -> np.ndarray:
    """Normalised radial distance (1 = outline) of an irregular ellipse."""
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / (r * math.sqrt(aniso))
    v = (-dx * sa + dy * ca) * (math.sqrt(aniso) / r)
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    f = np.ones_like(rho)
    for k, a, ph in harm:
        f += a * np.cos(k * theta + ph)
    return (rho / f).astype(np.float32)


def _bbox(cy: float, cx: float, ext: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 2, shape[0])
    x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 2, shape[1])
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _waves(rng: np.random.Generator, n: int, wavelength: float) -> np.ndarray:
    """Parameters (n, 4) of a sum of plane waves: ky, kx, phase, amplitude."""
    ang = rng.uniform(0, math.pi, n)
    k = 2 * math.pi / (wavelength * rng.uniform(0.7, 1.4, n))
    return np.stack([k * np.sin(ang), k * np.cos(ang), rng.uniform(0, 2 * math.pi, n), np.full(n, 1 / math.sqrt(n))], 1)


def _eval_waves(waves: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    for ky, kx, ph, a in waves:
        out += np.float32(a) * np.cos(ky * yy + kx * xx + ph, dtype=np.float32)
    return out


def _coarse_field(
    sl: tuple[slice, slice], step: int, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """Evaluate a smooth field ``fn(yy, xx)`` on a ``step``-coarse grid of the box and
    upsample it bilinearly to full resolution (pixel centres aligned)."""
    h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
    if step <= 1:
        yy = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None]
        xx = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :]
        return fn(yy, xx)
    nh, nw = -(-h // step), -(-w // step)
    yy = (sl[0].start + (np.arange(nh, dtype=np.float32) + 0.5) * step - 0.5)[:, None]
    xx = (sl[1].start + (np.arange(nw, dtype=np.float32) + 0.5) * step - 0.5)[None, :]
    coarse = np.ascontiguousarray(fn(yy, xx), dtype=np.float32)
    return cv2.resize(coarse, (nw * step, nh * step), interpolation=cv2.INTER_LINEAR)[:h, :w]


def _rasterise(
    rng: np.random.Generator, cells: list[_Cell], shape: tuple[int, int], s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cell and nucleus label images (1-based by list order) on the padded canvas.

    Nuclei are irregular ellipses; cells are a multiplicatively weighted Voronoi
    partition limited to each cell's own noisy outline (cost < 1), so dense cells touch
    and sparse ones leave background between them. A shared wavy field bends the
    boundaries. The smooth cost fields are computed on a coarse grid and upsampled.
    """
    best = np.full(shape, np.inf, np.float32)
    owner = np.zeros(shape, np.int32)
    nuclei = np.zeros(shape, np.int32)
    waves = _waves(rng, 8, 90.0 * s)
    step = max(int(3 * s), 1)
    for i, c in enumerate(cells, start=1):
        # nucleus
        n_ext = c.rn * math.sqrt(c.n_aniso) * 1.3 + 2
        sl = _bbox(c.y, c.x, n_ext, shape)

        def nuc_fn(yy, xx, c=c):
            return _radial_cost(yy, xx, c.y, c.x, c.rn, c.n_aniso, c.n_angle, c.n_harm)

        np.copyto(nuclei[sl], i, where=_coarse_field(sl, step, nuc_fn) < 1.0)
        # cell territory (the nucleus always belongs to its cell)
        ext = c.r * math.sqrt(c.aniso) * 1.6 + 2
        sl = _bbox(c.cy, c.cx, ext, shape)

        def cost_fn(yy, xx, c=c):
            return _radial_cost(yy, xx, c.cy, c.cx, c.r, c.aniso, c.angle, c.harm) + 0.07 * _eval_waves(waves, yy, xx)

        cost = _coarse_field(sl, step, cost_fn)
        np.copyto(cost, np.float32(-1.0), where=nuclei[sl] == i)
        better = cost < best[sl]
        np.copyto(best[sl], cost, where=better)
        np.copyto(owner[sl], i, where=better)
    owner[best >= 1.0] = 0
    nuclei[owner != nuclei] = 0
    return owner, nuclei


def _keep_main_component(owner: np.ndarray, nuclei: np.ndarray, n: int) -> list:
    """Per cell, keep only the connected piece that holds its nucleus (in place).

    Returns the cells' bounding boxes (``find_objects`` before the clean-up, so each box
    still contains its cell).
    """
    from scipy import ndimage

    objects = ndimage.find_objects(owner, max_label=n)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        m = owner[sl] == i
        n_lab, comp = cv2.connectedComponents(m.astype(np.uint8), connectivity=4)
        if n_lab <= 2:
            continue
        nuc = nuclei[sl] == i
        keep_id = np.bincount(comp[nuc], minlength=n_lab)[1:].argmax() + 1 if nuc.any() else 1
        owner[sl][m & (comp != keep_id)] = 0
        nuclei[sl][nuc & (comp != keep_id)] = 0
    return objects


# --------------------------------------------------------------------------------------
# Per-cell textures (all on the cell's bounding box)
# --------------------------------------------------------------------------------------
class _Ctx:
    """What the texture painters of one cell need, on its bounding-box crop."""

    def __init__(
        self,
        rng: np.random.Generator,
        cell: _Cell,
        sl: tuple[slice, slice],
        cell_mask: np.ndarray,
        nuc_mask: np.ndarray,
        s: float,
        visible: tuple[slice, slice] | None = None,
    ):
        self.rng = rng
        self.cell = cell
        self.s = s
        self.shape = cell_mask.shape
        self.m = cell_mask
        self.nm = nuc_mask
        self.cyto = cell_mask & ~nuc_mask
        self.mf = cell_mask.astype(np.float32)
        self.nf = nuc_mask.astype(np.float32)
        self.cf = self.cyto.astype(np.float32)
        self.cy = cell.y - sl[0].start  # nucleus centre in crop coordinates
        self.cx = cell.x - sl[1].start
        self.yy = np.arange(self.shape[0], dtype=np.float32)[:, None]
        self.xx = np.arange(self.shape[1], dtype=np.float32)[None, :]
        self.d_edge = _distance_inside(cell_mask)
        d_in = _distance_inside(nuc_mask)
        d_out = _distance_outside(nuc_mask)
        self.d_nuc = np.where(nuc_mask, -d_in, d_out)  # signed distance to the nuclear rim
        self.rn = cell.rn
        self.r = cell.r
        # point-like structures are placed preferably in the part of the crop that is
        # inside the image, so that border cells still show their pattern
        if visible is None:
            self.vis = np.ones(self.shape, np.float32)
        else:
            self.vis = np.full(self.shape, np.float32(0.02))
            self.vis[visible] = 1.0
        # the microtubule organising centre, next to the nucleus
        pts = _sample_points(rng, self.perinuclear(0.15 * self.rn), 1)
        self.mtoc = pts[0] if len(pts) else np.array([self.cy, self.cx], np.float32)
        self._nucleoli: np.ndarray | None = None
        self._nucleoli_mask: np.ndarray | None = None
        self._red: np.ndarray | None = None
        self._yellow: np.ndarray | None = None
        self._spindle: np.ndarray | None = None

    def px(self, ref: float) -> float:
        """Reference-px length in this image's px."""
        return ref * self.s

    def thick(self, ref: float) -> int:
        return max(int(round(ref * self.s)), 1)

    def perinuclear(self, width: float) -> np.ndarray:
        """Sampling weight: cytoplasm, decaying with the distance from the nucleus."""
        return self.cf * np.exp(-np.maximum(self.d_nuc, 0) / max(width, 0.5)) * self.vis

    def nuclear_interior(self, margin: float) -> np.ndarray:
        """Sampling weight: nucleus pixels at least ``margin`` px from its rim."""
        inner = (self.d_nuc < -margin).astype(np.float32)
        if not inner.any():
            inner = self.nf
        return inner * self.vis

    # shared structures -----------------------------------------------------------
    @property
    def nucleoli(self) -> np.ndarray:
        """(k, 3) nucleoli (y, x, radius) inside the nucleus."""
        if self._nucleoli is None:
            k = int(self.rng.integers(1, 5)) if not self.cell.mitotic else 0
            pts = _sample_points(self.rng, self.nuclear_interior(0.25 * self.rn), k)
            rad = self.rng.uniform(0.12, 0.22, len(pts)) * self.rn
            self._nucleoli = np.concatenate([pts, rad[:, None].astype(np.float32)], axis=1)
        return self._nucleoli

    def nucleoli_mask(self) -> np.ndarray:
        """Soft nucleoli blobs (max ~1); computed once, callers must not modify it."""
        if self._nucleoli_mask is None:
            out = np.zeros(self.shape, np.float32)
            for y, x, rad in self.nucleoli:
                d2 = ((self.yy - y) ** 2 + (self.xx - x) ** 2) / (rad * rad)
                out = np.maximum(out, np.exp(-(d2**2)))
            self._nucleoli_mask = out * self.nf
        return self._nucleoli_mask

    @property
    def spindle(self) -> np.ndarray:
        """Bipolar spindle of a dividing cell (max ~1)."""
        if self._spindle is None:
            c, rng = self.cell, self.rng
            a = c.n_angle  # metaphase plate long axis
            pa = np.array([math.sin(a), math.cos(a)])  # (y, x) along the plate
            pp = np.array([math.cos(a), -math.sin(a)])  # perpendicular: spindle axis
            centre = np.array([self.cy, self.cx])
            semi = c.rn * math.sqrt(c.n_aniso)  # plate half-length
            half = 0.95 * semi  # pole distance from the plate
            paths = []
            for sign in (-1.0, 1.0):
                pole = centre + sign * pp * half
                for t in np.linspace(-0.85, 0.85, 9) + rng.normal(0, 0.05, 9):
                    end = centre + pa * t * semi - sign * pp * rng.uniform(-0.05, 0.15) * half
                    mid = (pole + end) / 2 + pa * t * 0.15 * semi
                    paths.append(np.stack([pole, mid, end])[:, ::-1])
                # astral microtubules
                for b in rng.uniform(0, 2 * math.pi, 6):
                    end = pole + np.array([math.sin(b), math.cos(b)]) * rng.uniform(0.2, 0.45) * semi
                    paths.append(np.stack([pole, (pole + end) / 2, end])[:, ::-1])
            tex = 0.8 * _draw_paths(self.shape, np.asarray(paths), self.thick(2))
            poles = np.stack([centre - pp * half, centre + pp * half])
            tex = np.maximum(tex, _spots(self.shape, poles, 1.0, self.px(6)))
            self._spindle = np.clip(cv2.GaussianBlur(tex, (0, 0), max(self.px(2), 0.6)), 0, 1) * self.mf
        return self._spindle

    @property
    def red(self) -> np.ndarray:
        """Microtubule marker: filaments radiating from the MTOC (max ~1)."""
        if self._red is None:
            rng = self.rng
            if self.cell.mitotic:
                tex = self.spindle + 0.15 * self.cf
            else:
                # a few fibres from the MTOC, most spread through the cytoplasm
                n1, n2 = int(rng.integers(10, 25)), int(rng.integers(50, 90))
                starts1 = np.repeat(self.mtoc[None], n1, axis=0) + rng.normal(0, 0.15 * self.rn, (n1, 2))
                starts2 = _sample_points(rng, self.cf * (0.3 + np.exp(-np.maximum(self.d_nuc, 0) / self.r)), n2)
                starts = np.concatenate([starts1, starts2])
                n = len(starts)
                length = rng.uniform(0.5, 1.2, n) * self.r
                paths = _random_walks(rng, starts, rng.uniform(0, 2 * math.pi, n), 10, length / 10, 0.2)
                fil = np.zeros(self.shape, np.float32)
                for part in np.array_split(np.arange(n), 3):  # three brightness groups
                    fil = np.maximum(fil, _draw_paths(self.shape, paths[part], self.thick(2.5)) * rng.uniform(0.4, 1.0))
                fil = cv2.GaussianBlur(fil, (0, 0), max(self.px(1.5), 0.5))
                diffuse = 0.3 * (1.0 + 0.3 * _smooth_noise(rng, self.shape, self.px(60)))
                edge_fall = 1.0 - np.exp(-self.d_edge / self.px(25))
                tex = (fil * 0.6 + diffuse) * edge_fall
                tex = tex * (1.0 - 0.6 * self.nf)
            self._red = np.clip(tex, 0, 1.5) * self.mf
        return self._red

    @property
    def yellow(self) -> np.ndarray:
        """ER marker: a reticular network, densest around the nucleus (max ~1)."""
        if self._yellow is None:
            rng = self.rng
            n = _smooth_noise(rng, self.shape, self.px(16))
            net = np.exp(-((n / 0.35) ** 2))
            density = 0.35 + 0.65 * np.exp(-np.maximum(self.d_nuc, 0) / (0.6 * self.r))
            edge_fall = 1.0 - np.exp(-self.d_edge / self.px(20))
            tex = (0.75 * net + 0.25) * density * edge_fall * self.cf
            rim = np.exp(-((self.d_nuc / self.px(5)) ** 2)) * 0.6
            tex = tex + rim * self.mf + 0.08 * self.nf
            self._yellow = np.clip(tex, 0, 1.2) * self.mf
        return self._yellow


# -- green patterns, one per class ---------------------------------------------------
def _p_nucleoplasm(c: _Ctx) -> np.ndarray:
    tex = 0.8 + 0.2 * _smooth_noise(c.rng, c.shape, c.px(12))
    tex = tex * (1.0 - 0.7 * c.nucleoli_mask())
    return np.clip(tex, 0, None) * c.nf


def _p_nuclear_membrane(c: _Ctx) -> np.ndarray:
    rim = np.exp(-((c.d_nuc / max(c.px(5), 0.8)) ** 2))
    return np.clip(1.5 * rim * (0.85 + 0.15 * _smooth_noise(c.rng, c.shape, c.px(20))), 0, 1.2) * c.mf


def _p_nucleoli(c: _Ctx) -> np.ndarray:
    blob = c.nucleoli_mask()
    return blob * (0.85 + 0.15 * _smooth_noise(c.rng, c.shape, c.px(6)))


def _p_fibrillar_center(c: _Ctx) -> np.ndarray:
    pts = []
    for y, x, rad in c.nucleoli:
        k = int(c.rng.integers(3, 8))
        ang = c.rng.uniform(0, 2 * math.pi, k)
        dist = c.rng.uniform(0, 0.6, k) * rad
        pts.append(np.stack([y + dist * np.sin(ang), x + dist * np.cos(ang)], axis=1))
    pts_a = np.concatenate(pts) if pts else np.zeros((0, 2))
    return np.clip(_spots(c.shape, pts_a, 1.0, c.px(3)), 0, 1.2) * c.nf


def _p_speckles(c: _Ctx) -> np.ndarray:
    inner = c.nuclear_interior(c.px(4)) * (c.nucleoli_mask() < 0.3)
    k = int(c.rng.integers(20, 45))
    pts = _sample_points(c.rng, inner, k)
    sp = _spots(c.shape, pts, c.rng.uniform(0.5, 1.0, len(pts)), c.px(7))
    sp = sp * (0.7 + 0.3 * np.clip(_smooth_noise(c.rng, c.shape, c.px(5)), -1, 1))
    return (np.clip(sp, 0, 1.2) + 0.1) * c.nf


def _p_nuclear_bodies(c: _Ctx) -> np.ndarray:
    k = int(c.rng.integers(2, 8))
    pts = _sample_points(c.rng, c.nuclear_interior(c.px(6)), k)
    return np.clip(_spots(c.shape, pts, c.rng.uniform(0.8, 1.0, len(pts)), c.px(6)), 0, 1.2) * c.nf


def _p_er(c: _Ctx) -> np.ndarray:
    return c.yellow * (0.9 + 0.1 * _smooth_noise(c.rng, c.shape, c.px(10)))


def _p_golgi(c: _Ctx) -> np.ndarray:
    rng = c.rng
    anchor = _sample_points(rng, c.perinuclear(0.15 * c.rn), 1)
    if len(anchor) == 0:
        return np.zeros(c.shape, np.float32)
    radial = anchor[0] - np.array([c.cy, c.cx])
    radial = radial / max(float(np.hypot(*radial)), 1e-6)
    tangent = np.array([-radial[1], radial[0]])
    k = int(rng.integers(6, 14))
    # a ribbon of small stacks along the nuclear rim, on one side
    pts = anchor + np.outer(rng.normal(0, 0.45 * c.rn, k), tangent) + np.outer(rng.normal(0.1, 0.1, k) * c.rn, radial)
    blob = _spots(c.shape, pts, rng.uniform(0.5, 1.0, k), 0.09 * c.r)
    return np.clip(_norm(blob), 0, 1.2) * c.cf


def _p_intermediate_filaments(c: _Ctx) -> np.ndarray:
    rng = c.rng
    n = int(rng.integers(30, 50))
    # start around the nucleus, run roughly tangentially: a perinuclear cage of long,
    # wavy fibres that spreads into the cytoplasm
    starts = _sample_points(rng, c.perinuclear(0.3 * c.rn), n)
    rel = starts - np.array([c.cy, c.cx])
    heading = np.arctan2(rel[:, 0], rel[:, 1]) + np.where(rng.random(len(starts)) < 0.5, 1, -1) * (
        math.pi / 2 - rng.uniform(0, 0.6, len(starts))
    )
    paths = _random_walks(rng, starts, heading, 16, rng.uniform(1.0, 1.8, len(starts)) * c.r / 16, 0.18)
    fil = _draw_paths(c.shape, paths, c.thick(3.5))
    return np.clip(cv2.GaussianBlur(fil, (0, 0), max(c.px(2), 0.5)) * 1.3, 0, 1) * c.cf


def _p_actin(c: _Ctx) -> np.ndarray:
    rng = c.rng
    n = int(rng.integers(12, 25))
    a = c.cell.angle + rng.normal(0, 0.15)
    # straight stress fibres, parallel to the long axis, across the cell
    off = rng.uniform(-1.0, 1.0, n) * c.r
    along = rng.uniform(-1.6, -0.4, n) * c.r
    ca, sa = math.cos(a), math.sin(a)
    starts = np.stack([c.cy + off * ca + along * sa, c.cx - off * sa + along * ca], axis=1)
    paths = _random_walks(rng, starts, np.full(n, a) + rng.normal(0, 0.06, n), 4, rng.uniform(0.5, 0.8, n) * c.r, 0.02)
    fibres = _draw_paths(c.shape, paths, c.thick(4))
    cortex = np.exp(-c.d_edge / c.px(8))
    tex = 0.8 * fibres + 0.7 * cortex
    return np.clip(cv2.GaussianBlur(tex, (0, 0), max(c.px(1.5), 0.5)), 0, 1) * c.mf * (1.0 - 0.6 * c.nf)


def _p_microtubules(c: _Ctx) -> np.ndarray:
    return c.red * (0.9 + 0.1 * _smooth_noise(c.rng, c.shape, c.px(10)))


def _p_mitotic_spindle(c: _Ctx) -> np.ndarray:
    return c.spindle


def _p_centrosome(c: _Ctx) -> np.ndarray:
    k = int(c.rng.integers(1, 3))
    pts = c.mtoc[None] + c.rng.normal(0, c.px(5), (k, 2))
    sp = _spots(c.shape, pts, 1.0, c.px(5))
    return np.clip(sp, 0, 1.2) * c.mf + 0.04 * c.cf


def _p_plasma_membrane(c: _Ctx) -> np.ndarray:
    band = np.exp(-c.d_edge / max(c.px(7), 0.8))
    return np.clip(1.6 * band * (0.8 + 0.2 * _smooth_noise(c.rng, c.shape, c.px(15))), 0, 1.2) * c.mf


def _p_mitochondria(c: _Ctx) -> np.ndarray:
    rng = c.rng
    weight = c.perinuclear(0.7 * c.r)
    n = int(rng.integers(150, 260))
    starts = _sample_points(rng, weight, n)
    paths = _random_walks(rng, starts, rng.uniform(0, 2 * math.pi, len(starts)), 3, c.px(rng.uniform(4, 10)), 0.45)
    fil = _draw_paths(c.shape, paths, c.thick(3))
    return np.clip(cv2.GaussianBlur(fil, (0, 0), max(c.px(1.5), 0.5)) * 1.2, 0, 1) * c.cf


def _p_aggresome(c: _Ctx) -> np.ndarray:
    rng = c.rng
    anchor = _sample_points(rng, c.perinuclear(0.2 * c.rn) * (c.d_nuc > 0.1 * c.rn), 1)
    if len(anchor) == 0:
        anchor = _sample_points(rng, c.perinuclear(0.2 * c.rn), 1)
    pts = anchor + rng.normal(0, 0.06 * c.rn, (4, 2)) if len(anchor) else anchor
    blob = _spots(c.shape, pts, 1.0, 0.12 * c.rn)
    return np.clip(_norm(blob, 99.9) * 1.3, 0, 1.3) * c.mf * (1.0 - 0.8 * c.nf) + 0.03 * c.cf


def _p_cytosol(c: _Ctx) -> np.ndarray:
    tex = 0.8 + 0.2 * _smooth_noise(c.rng, c.shape, c.px(40))
    return np.clip(tex, 0, None) * (1.0 - np.exp(-c.d_edge / c.px(20))) * c.cf


def _p_vesicles(c: _Ctx) -> np.ndarray:
    rng = c.rng
    n = int(rng.integers(60, 160))
    pts = _sample_points(rng, c.cf * c.vis, n)
    sp = _spots(c.shape, pts, rng.uniform(0.4, 1.0, len(pts)), c.px(4))
    return np.clip(sp, 0, 1.2) * c.cf


def _p_negative(c: _Ctx) -> np.ndarray:
    return np.zeros(c.shape, np.float32)


_PATTERNS: dict[int, Callable[[_Ctx], np.ndarray]] = {
    0: _p_nucleoplasm,
    1: _p_nuclear_membrane,
    2: _p_nucleoli,
    3: _p_fibrillar_center,
    4: _p_speckles,
    5: _p_nuclear_bodies,
    6: _p_er,
    7: _p_golgi,
    8: _p_intermediate_filaments,
    9: _p_actin,
    10: _p_microtubules,
    11: _p_mitotic_spindle,
    12: _p_centrosome,
    13: _p_plasma_membrane,
    14: _p_mitochondria,
    15: _p_aggresome,
    16: _p_cytosol,
    17: _p_vesicles,
    18: _p_negative,
}


def _blue(c: _Ctx) -> np.ndarray:
    chrom = 0.75 + 0.25 * _smooth_noise(c.rng, c.shape, c.px(10))
    tex = chrom * (1.0 - 0.5 * c.nucleoli_mask())
    tex = tex * (0.75 + 0.25 * (1.0 - np.exp(-(-np.minimum(c.d_nuc, 0)) / c.px(6))))
    if c.cell.mitotic:
        tex = tex * 1.6
    return np.clip(tex, 0, None) * c.nf


# --------------------------------------------------------------------------------------
# Classes per cell
# --------------------------------------------------------------------------------------
_NOT_IN_MITOSIS = frozenset({1, 2, 3, 4, 5})

P_VARIABLE_IMAGE = 0.5
"""Share of images (with a positive pattern) where one class varies from cell to cell."""
VARIABLE_SHARE = (0.2, 0.7)
"""Range of the share of cells that show the variable class in such an image."""


def _random_image_labels(rng: np.random.Generator) -> list[int]:
    if rng.random() < 0.05:
        return [NEGATIVE]
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.33, 0.17]))
    p = _CLASS_WEIGHTS / _CLASS_WEIGHTS.sum()
    return sorted(int(c) for c in rng.choice(NUM_CLASSES - 1, size=k, replace=False, p=p))


def _assign_classes(
    rng: np.random.Generator, cells: list[_Cell], areas: np.ndarray, requested: list[int]
) -> None:
    """Give every (kept) cell its classes: most the image pattern, some a subset, some none.

    On top of that, in a share ``P_VARIABLE_IMAGE`` of the images one interphase class of
    the pattern is *variable*: only a share ``U(VARIABLE_SHARE)`` of the other cells show
    it (the HPA Cell Atlas reports cell-to-cell variation for many proteins), so that
    broadcasting the image labels to every cell is measurably wrong. The largest
    interphase cell always shows the whole pattern, so the image labels are unchanged.
    """
    pattern = sorted(set(requested) - {NEGATIVE})
    n = len(cells)
    if n == 0:
        return
    if not pattern:
        for c in cells:
            c.classes = [NEGATIVE]
        return
    interphase = [c for c in pattern if c != 11]
    p_neg = rng.uniform(0.05, 0.2)
    p_sub = rng.uniform(0.05, 0.25) if len(interphase) >= 2 else 0.0
    order = np.argsort(-areas, kind="stable")
    variable, keep_share = -1, 1.0
    if interphase and rng.random() < P_VARIABLE_IMAGE:
        variable = int(rng.choice(interphase))
        keep_share = float(rng.uniform(*VARIABLE_SHARE))
    full_cell = None
    for i in order:
        c = cells[i]
        if c.mitotic:
            # a dividing cell has no nuclear envelope, nucleoli or nuclear bodies to show
            drawable = [k for k in interphase if k not in _NOT_IN_MITOSIS]
            if 11 in pattern:
                c.classes = sorted({11, *(k for k in drawable if rng.random() < 0.5)})
            else:
                c.classes = drawable or [NEGATIVE]
            continue
        if not interphase:
            c.classes = [NEGATIVE]
            continue
        u = rng.random()
        if full_cell is None:
            u = 1.0  # the largest interphase cell always shows the whole pattern
        if u < p_neg:
            c.classes = [NEGATIVE]
        elif u < p_neg + p_sub:
            k = int(rng.integers(1, len(interphase)))
            c.classes = sorted(int(x) for x in rng.choice(interphase, size=k, replace=False))
        else:
            c.classes = list(interphase)
            full_cell = full_cell if full_cell is not None else i
        if variable in c.classes and full_cell != i and rng.random() >= keep_share:
            c.classes = [k for k in c.classes if k != variable] or [NEGATIVE]
    if NEGATIVE in requested and all(c.classes != [NEGATIVE] for c in cells) and n >= 2:
        for i in order[::-1]:
            if i != full_cell and not cells[i].mitotic:
                cells[i].classes = [NEGATIVE]
                break
    if 11 in pattern and not any(c.mitotic for c in cells):  # cannot happen for n >= 1 in-image cells
        cells[order[0]].classes = sorted(set(cells[order[0]].classes) - {NEGATIVE} | {11})


# --------------------------------------------------------------------------------------
# make_image
# --------------------------------------------------------------------------------------
def make_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    image_labels: list[int] | None = None,
    depth: int = 8,
    n_cells: int | None = None,
) -> SyntheticImage:
    """Draw one HPA-like RGBY image with per-cell truth.

    Parameters
    ----------
    rng : the random generator (the only source of randomness).
    height, width : image size in px; any size, square or not.
    image_labels : the image's pattern (class ids). ``None`` draws 1-3 classes at random;
        ``[18]`` gives an all-Negative image. Most cells show the whole pattern, some a
        subset or nothing (Negative); class 11 (mitotic spindle) only appears in dividing
        cells. The returned ``image_labels`` is the union of the cells' classes.
    depth : 8 (uint8) or 16 (uint16).
    n_cells : number of cells whose nucleus centre lies inside the image (default: 10-40
        scaled by the image area relative to 2048 x 2048). A few more, cut by the border,
        may be added.

    Returns
    -------
    SyntheticImage
    """
    height, width = int(height), int(width)
    if height < 16 or width < 16:
        raise ValueError(f"image too small: {height}x{width}")
    if depth not in (8, 16):
        raise ValueError(f"depth must be 8 or 16, got {depth!r}")
    if image_labels is not None:
        bad = [c for c in image_labels if not 0 <= int(c) < NUM_CLASSES]
        if bad:
            raise ValueError(f"class ids outside 0..{NUM_CLASSES - 1}: {bad}")
        requested = sorted({int(c) for c in image_labels})
    else:
        requested = _random_image_labels(rng)

    s = math.sqrt(height * width) / REF_SIDE  # px per reference px
    if n_cells is None:
        n_cells = int(round(rng.integers(10, 41) * (height * width) / (s * REF_SIDE) ** 2))
    n_cells = max(int(n_cells), 0)
    # the canvas extends beyond the image so that border cells are whole: their
    # edge-dependent textures stay right, and the border cuts them, not the canvas
    pad = int(math.ceil(240 * s)) + 4
    margin = 90.0 * s
    seeds, inside = _place_seeds(rng, height, width, n_cells, margin, s)
    cells = _make_cells(rng, seeds + pad, inside, s)

    # dividing cells: for the mitotic-spindle class, and now and then anyway
    in_idx = [i for i, c in enumerate(cells) if c.inside]
    n_mit = 0
    if 11 in requested and in_idx:
        n_mit = int(rng.integers(1, max(2, len(in_idx) // 6) + 1))
        if len([c for c in requested if c not in (11, NEGATIVE)]) and len(in_idx) >= 2:
            n_mit = min(n_mit, len(in_idx) - 1)
    elif in_idx and rng.random() < 0.15:
        n_mit = 1
    for i in rng.choice(in_idx, size=min(n_mit, len(in_idx)), replace=False) if in_idx else []:
        c = cells[int(i)]
        c.mitotic = True
        c.r *= 0.8
        c.aniso = 1.0 + 0.1 * (c.aniso - 1.0)
        c.harm[:, 1] *= 0.3
        c.cy, c.cx = c.y, c.x
        c.n_aniso = rng.uniform(3.0, 4.5)  # condensed metaphase plate
        c.rn *= 0.7

    _fit_nuclei(cells)
    shape = (height + 2 * pad, width + 2 * pad)
    owner, nuclei = _rasterise(rng, cells, shape, s)
    objects = _keep_main_component(owner, nuclei, len(cells))

    # which cells survive the crop to the image
    crop = (slice(pad, pad + height), slice(pad, pad + width))
    n = len(cells)
    nuc_full = np.bincount(nuclei.ravel(), minlength=n + 1)
    nuc_vis = np.bincount(nuclei[crop].ravel(), minlength=n + 1)
    cell_vis = np.bincount(owner[crop].ravel(), minlength=n + 1)
    keep = [
        i
        for i in range(1, n + 1)
        if nuc_vis[i] > 0 and cell_vis[i] > 0 and (cells[i - 1].inside or nuc_vis[i] >= 0.3 * nuc_full[i])
    ]
    # raster order of the nucleus centres gives the final, consecutive labels
    keep.sort(key=lambda i: (round(cells[i - 1].y), round(cells[i - 1].x)))
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    kept = [cells[i - 1] for i in keep]
    _assign_classes(rng, kept, cell_vis[keep].astype(float), requested)

    # paint the channels, cell by cell on bounding boxes of the padded canvas (so that
    # cells cut by the border keep their true edges), adding only what is in the image
    img = np.zeros((height, width, 4), np.float32)
    g_img = rng.uniform(0.45, 1.0)  # expression level of the image's protein
    for i in keep:
        sl = objects[i - 1]
        c = cells[i - 1]
        # intersection of the box with the image, in box and image coordinates (never
        # empty: a kept cell has pixels in the image and its box contains them)
        y0, y1 = max(sl[0].start, pad), min(sl[0].stop, pad + height)
        x0, x1 = max(sl[1].start, pad), min(sl[1].stop, pad + width)
        box = (slice(y0 - sl[0].start, y1 - sl[0].start), slice(x0 - sl[1].start, x1 - sl[1].start))
        ctx = _Ctx(rng, c, sl, owner[sl] == i, nuclei[sl] == i, s, visible=box)
        red = ctx.red * rng.lognormal(0.0, 0.25) * 0.7
        yellow = ctx.yellow * rng.lognormal(0.0, 0.25) * 0.65
        blue = _blue(ctx) * rng.lognormal(0.0, 0.2) * 0.7
        green = np.zeros(ctx.shape, np.float32)
        for k in c.classes:
            green += _PATTERNS[k](ctx) * rng.uniform(0.6, 1.0)
        green *= g_img * np.clip(rng.lognormal(0.0, 0.35), 0.5, 2.0) * 0.75  # per-cell level
        dst = img[y0 - pad : y1 - pad, x0 - pad : x1 - pad]
        for ch, tex in enumerate((red, green, blue, yellow)):
            dst[..., ch] += tex[box]

    rgby = _acquire(rng, img, depth, s)
    cell_labels = lut[owner[crop]]
    nuclei_labels = lut[nuclei[crop]]
    cell_classes = {j + 1: list(c.classes) for j, c in enumerate(kept)}
    union = sorted({k for v in cell_classes.values() for k in v})
    return SyntheticImage(
        rgby=rgby, cell_labels=cell_labels, nuclei_labels=nuclei_labels, cell_classes=cell_classes, image_labels=union
    )


def _acquire(rng: np.random.Generator, img: np.ndarray, depth: int, s: float) -> np.ndarray:
    """Optics blur, background, shot and read noise, quantisation of (H, W, 4) float."""
    h, w, _ = img.shape
    img = cv2.GaussianBlur(img, (0, 0), max(1.2 * s, 0.5))
    bg_level = rng.uniform(0.01, 0.04, 4).astype(np.float32)
    vignette = 1.0 + 0.25 * _smooth_noise(rng, (h, w), 500.0 * s)
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


# --------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------
def image_id(rng: np.random.Generator) -> str:
    """A uuid-like hex ID (``8-4-4-4-12``), as the HPA IDs look."""
    h = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 16))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _parse_sizes(sizes: SizeSpec | Sequence[SizeSpec]) -> list[tuple[int, int]]:
    """Sides (``2048``) or ``(h, w)`` pairs, or strings ``"768x1024"`` -> list of (h, w)."""
    if isinstance(sizes, (int, np.integer)):
        return [(int(sizes), int(sizes))]
    if isinstance(sizes, str):
        sizes = [t for t in sizes.split(",") if t.strip()]
    out = []
    for sz in sizes:
        if isinstance(sz, str):
            parts = sz.lower().replace("×", "x").split("x")
            hw = [int(p) for p in parts]
            out.append((hw[0], hw[-1]))
        elif isinstance(sz, (int, np.integer)):
            out.append((int(sz), int(sz)))
        else:
            h, w = sz
            out.append((int(h), int(w)))
    if not out:
        raise ValueError("no image sizes given")
    return out


def _parse_depths(depth: DepthSpec) -> list[int]:
    if isinstance(depth, str):
        if depth == "mixed":
            return [8, 16]
        return [int(depth)]
    if isinstance(depth, (int, np.integer)):
        out = [int(depth)]
    else:
        out = [int(d) for d in depth]
    if not out or any(d not in (8, 16) for d in out):
        raise ValueError(f"depth must be 8, 16, 'mixed' or a list of them, got {depth!r}")
    return out


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _write_one(out: Path, split: str, seed: int, index: int, hw: tuple[int, int], depth: int) -> dict:
    rng = np.random.default_rng([int(seed), int(index)])
    iid = image_id(np.random.default_rng([int(seed), int(index), 1]))
    img = make_image(rng, hw[0], hw[1], depth=depth)
    folder = out / split
    for ch, name in enumerate(CHANNELS):
        _write_png(channel_path(folder, iid, name), np.ascontiguousarray(img.rgby[..., ch]))
    write_label_image(out / "truth", iid, img.cell_labels)
    return {
        "ID": iid,
        "width": img.width,
        "height": img.height,
        "labels": img.image_labels,
        "cells": img.cell_classes,
    }


def write_dataset(
    out: str | Path,
    images: int,
    seed: int,
    sizes: SizeSpec | Sequence[SizeSpec] = (2048,),
    depth: DepthSpec = 8,
    split: str = "test",
    n_jobs: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``images`` synthetic images in the Kaggle layout, with per-cell truth.

    Layout::

        out/<split>/<ID>_{red,green,blue,yellow}.png
        out/sample_submission.csv   ID,ImageWidth,ImageHeight,PredictionString (empty)
        out/train.csv               ID,Label (image labels, '|'-separated)
        out/truth/labels/<ID>.png   uint16 cell label image at the original size
        out/truth/cells.csv         ID,cell_id,Label

    Parameters
    ----------
    sizes : a side, or a list of sides / ``(h, w)`` pairs / ``"HxW"`` strings, cycled
        over the images.
    depth : 8, 16, ``"mixed"`` (8 and 16 alternating) or a list cycled over the images.
    n_jobs : joblib workers (the files do not depend on it).

    Image ``i`` is drawn from ``np.random.default_rng([seed, i])``: the same seed gives
    byte-identical files.
    """
    import pandas as pd

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    out = Path(out)
    hws = _parse_sizes(sizes)
    depths = _parse_depths(depth)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "truth" / "labels").mkdir(parents=True, exist_ok=True)
    jobs = [(i, hws[i % len(hws)], depths[i % len(depths)]) for i in range(int(images))]

    from tqdm.auto import tqdm

    it = tqdm(jobs, desc="synthetic", unit="img", disable=not progress)
    if n_jobs == 1:
        records = [_write_one(out, split, seed, i, hw, d) for i, hw, d in it]
    else:
        from joblib import Parallel, delayed

        records = Parallel(n_jobs=n_jobs)(delayed(_write_one)(out, split, seed, i, hw, d) for i, hw, d in it)

    pd.DataFrame(
        {
            "ID": [r["ID"] for r in records],
            "ImageWidth": [r["width"] for r in records],
            "ImageHeight": [r["height"] for r in records],
            "PredictionString": [""] * len(records),
        }
    ).to_csv(out / "sample_submission.csv", index=False)
    pd.DataFrame({"ID": [r["ID"] for r in records], "Label": [format_labels(r["labels"]) for r in records]}).to_csv(
        out / "train.csv", index=False
    )
    write_truth_index(out / "truth", {r["ID"]: r["cells"] for r in records})
    logger.info("wrote %d synthetic images to %s", len(records), out)
    return out


SAMPLE_SEED = 2021
SAMPLE_SIZES: tuple = (512, 768, 1024, (768, 1024), 512, 1024)
SAMPLE_DEPTHS: tuple = (8, 16)
_SAMPLE_MARKER = ".hpa_kernel_samples_complete"


def sample_dataset(out: str | Path | None = None) -> Path:
    """The bundled sample set for the README dry run (6 small test images).

    Generated on the fly into ``out`` (default ``./hpa_kernel_samples``) unless a
    complete copy is already there; fixed seed, sizes 512-1024 including one
    non-square (768 x 1024, h x w) image, 8- and 16-bit.
    """
    out = Path(out) if out is not None else Path.cwd() / "hpa_kernel_samples"
    spec = f"seed={SAMPLE_SEED} sizes={SAMPLE_SIZES} depths={SAMPLE_DEPTHS}"
    marker = out / _SAMPLE_MARKER
    if marker.is_file() and marker.read_text() == spec:
        logger.info("reusing the sample set in %s", out)
        return out
    write_dataset(out, len(SAMPLE_SIZES), SAMPLE_SEED, sizes=SAMPLE_SIZES, depth=SAMPLE_DEPTHS, progress=False)
    marker.write_text(spec)
    return out


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m hpa_kernel.tools.synthetic --out DIR --images N --seed S [...]``."""
    p = argparse.ArgumentParser(prog="python -m hpa_kernel.tools.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=8, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--size", type=int, help="image side (square)")
    g.add_argument("--sizes", help="comma-separated sides or HxW, cycled: 1728,2048,768x1024")
    p.add_argument("--depth", default="8", choices=["8", "16", "mixed"])
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--jobs", type=int, default=1, help="parallel workers")
    a = p.parse_args(argv)
    sizes: SizeSpec | str = a.size if a.size else (a.sizes or 2048)
    depth: DepthSpec = a.depth if a.depth == "mixed" else int(a.depth)
    out = write_dataset(a.out, a.images, a.seed, sizes=sizes, depth=depth, split=a.split, n_jobs=a.jobs)
    print(f"wrote {a.images} images to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
