"""Cell geometry: seeds, irregular cell and nucleus outlines, and their label images.

Every length is in reference px (a 2048 px field of view) times ``s``, the image's px per
reference px; everything here works on the padded canvas (the image plus a border band,
so that cells cut by the image border are whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import cv2
import numpy as np


@dataclass
class Cell:
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


def place_seeds(rng: np.random.Generator, height: int, width: int, n_in: int, margin: float,
                s: float) -> tuple[np.ndarray, np.ndarray]:
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


def make_cells(rng: np.random.Generator, seeds: np.ndarray, inside: np.ndarray, s: float) -> list[Cell]:
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
            Cell(
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


def fit_nuclei(cells: list[Cell]) -> None:
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


def _radial_cost(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, aniso: float, angle: float,
                 harm: np.ndarray) -> np.ndarray:
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


def _coarse_field(sl: tuple[slice, slice], step: int,
                  fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
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


def rasterise(rng: np.random.Generator, cells: list[Cell], shape: tuple[int, int],
              s: float) -> tuple[np.ndarray, np.ndarray]:
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


def keep_main_component(owner: np.ndarray, nuclei: np.ndarray, n: int) -> list:
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

