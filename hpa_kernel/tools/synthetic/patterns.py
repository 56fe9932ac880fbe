"""Per-cell textures on the cell's bounding-box crop: the markers (red microtubules,
yellow ER, blue nucleus) and one green pattern per class (:data:`PATTERNS`, class id ->
painter). Each painter takes the cell's :class:`Ctx` and returns a float32 crop, max ~1.
"""

from __future__ import annotations

import math
from functools import cached_property

import cv2
import numpy as np

from hpa_kernel.tools.synthetic.acquire import smooth_noise
from hpa_kernel.tools.synthetic.cells import Cell


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


def _random_walks(rng: np.random.Generator, starts: np.ndarray, angles: np.ndarray, n_steps: int,
                  step: float | np.ndarray, turn_sd: float) -> np.ndarray:
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


def _distance(mask: np.ndarray, beyond: int = 0) -> np.ndarray:
    """Euclidean distance of each ``mask`` pixel to the nearest pixel outside it (0 outside).

    Pixels beyond the crop count as ``beyond`` (1: inside the mask, so that the crop edge
    is not mistaken for the mask's edge); 1e6 everywhere when nothing is outside.
    """
    if mask.all() and beyond:
        return np.full(mask.shape, np.float32(1e6), np.float32)
    padded = np.pad(mask.astype(np.uint8), 1, constant_values=beyond)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _norm(a: np.ndarray, q: float = 99.5) -> np.ndarray:
    """Scale ``a`` so its ``q`` percentile of positive values is 1."""
    pos = a[a > 0]
    if pos.size == 0:
        return a
    ref = float(np.percentile(pos, q))
    return a / np.float32(ref if ref > 1e-9 else 1.0)


class Ctx:
    """What the texture painters of one cell need, on its bounding-box crop."""

    def __init__(self, rng: np.random.Generator, cell: Cell, sl: tuple[slice, slice], cell_mask: np.ndarray,
                 nuc_mask: np.ndarray, s: float, visible: tuple[slice, slice] | None = None):
        self.rng, self.cell, self.s, self.shape = rng, cell, s, cell_mask.shape
        self.mf = cell_mask.astype(np.float32)
        self.nf = nuc_mask.astype(np.float32)
        self.cf = (cell_mask & ~nuc_mask).astype(np.float32)
        self.cy = cell.y - sl[0].start  # nucleus centre in crop coordinates
        self.cx = cell.x - sl[1].start
        self.d_edge = _distance(cell_mask)
        # signed distance to the nuclear rim
        self.d_nuc = np.where(nuc_mask, -_distance(nuc_mask), _distance(~nuc_mask, beyond=1))
        self.rn, self.r = cell.rn, cell.r
        # point-like structures are placed preferably in the part of the crop that is
        # inside the image, so that border cells still show their pattern
        self.vis = np.full(self.shape, np.float32(1.0 if visible is None else 0.02))
        if visible is not None:
            self.vis[visible] = 1.0
        # the microtubule organising centre, next to the nucleus
        pts = _sample_points(rng, self.perinuclear(0.15 * self.rn), 1)
        self.mtoc = pts[0] if len(pts) else np.array([self.cy, self.cx], np.float32)

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
    @cached_property
    def nucleoli(self) -> np.ndarray:
        """(k, 3) nucleoli (y, x, radius) inside the nucleus."""
        k = int(self.rng.integers(1, 5)) if not self.cell.mitotic else 0
        pts = _sample_points(self.rng, self.nuclear_interior(0.25 * self.rn), k)
        rad = self.rng.uniform(0.12, 0.22, len(pts)) * self.rn
        return np.concatenate([pts, rad[:, None].astype(np.float32)], axis=1)

    @cached_property
    def nucleoli_mask(self) -> np.ndarray:
        """Soft nucleoli blobs (max ~1); computed once, callers must not modify it."""
        out = np.zeros(self.shape, np.float32)
        yy = np.arange(self.shape[0], dtype=np.float32)[:, None]
        xx = np.arange(self.shape[1], dtype=np.float32)[None, :]
        for y, x, rad in self.nucleoli:
            d2 = ((yy - y) ** 2 + (xx - x) ** 2) / (rad * rad)
            out = np.maximum(out, np.exp(-(d2**2)))
        return out * self.nf

    @cached_property
    def spindle(self) -> np.ndarray:
        """Bipolar spindle of a dividing cell (max ~1)."""
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
        return np.clip(cv2.GaussianBlur(tex, (0, 0), max(self.px(2), 0.6)), 0, 1) * self.mf

    @cached_property
    def red(self) -> np.ndarray:
        """Microtubule marker: filaments radiating from the MTOC (max ~1)."""
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
            diffuse = 0.3 * (1.0 + 0.3 * smooth_noise(rng, self.shape, self.px(60)))
            edge_fall = 1.0 - np.exp(-self.d_edge / self.px(25))
            tex = (fil * 0.6 + diffuse) * edge_fall
            tex = tex * (1.0 - 0.6 * self.nf)
        return np.clip(tex, 0, 1.5) * self.mf

    @cached_property
    def yellow(self) -> np.ndarray:
        """ER marker: a reticular network, densest around the nucleus (max ~1)."""
        rng = self.rng
        n = smooth_noise(rng, self.shape, self.px(16))
        net = np.exp(-((n / 0.35) ** 2))
        density = 0.35 + 0.65 * np.exp(-np.maximum(self.d_nuc, 0) / (0.6 * self.r))
        edge_fall = 1.0 - np.exp(-self.d_edge / self.px(20))
        tex = (0.75 * net + 0.25) * density * edge_fall * self.cf
        rim = np.exp(-((self.d_nuc / self.px(5)) ** 2)) * 0.6
        tex = tex + rim * self.mf + 0.08 * self.nf
        return np.clip(tex, 0, 1.2) * self.mf


# -- green patterns, one per class ---------------------------------------------------
def _p_nucleoplasm(c: Ctx) -> np.ndarray:
    tex = 0.8 + 0.2 * smooth_noise(c.rng, c.shape, c.px(12))
    tex = tex * (1.0 - 0.7 * c.nucleoli_mask)
    return np.clip(tex, 0, None) * c.nf


def _p_nuclear_membrane(c: Ctx) -> np.ndarray:
    rim = np.exp(-((c.d_nuc / max(c.px(5), 0.8)) ** 2))
    return np.clip(1.5 * rim * (0.85 + 0.15 * smooth_noise(c.rng, c.shape, c.px(20))), 0, 1.2) * c.mf


def _p_nucleoli(c: Ctx) -> np.ndarray:
    blob = c.nucleoli_mask
    return blob * (0.85 + 0.15 * smooth_noise(c.rng, c.shape, c.px(6)))


def _p_fibrillar_center(c: Ctx) -> np.ndarray:
    pts = []
    for y, x, rad in c.nucleoli:
        k = int(c.rng.integers(3, 8))
        ang = c.rng.uniform(0, 2 * math.pi, k)
        dist = c.rng.uniform(0, 0.6, k) * rad
        pts.append(np.stack([y + dist * np.sin(ang), x + dist * np.cos(ang)], axis=1))
    pts_a = np.concatenate(pts) if pts else np.zeros((0, 2))
    return np.clip(_spots(c.shape, pts_a, 1.0, c.px(3)), 0, 1.2) * c.nf


def _p_speckles(c: Ctx) -> np.ndarray:
    inner = c.nuclear_interior(c.px(4)) * (c.nucleoli_mask < 0.3)
    k = int(c.rng.integers(20, 45))
    pts = _sample_points(c.rng, inner, k)
    sp = _spots(c.shape, pts, c.rng.uniform(0.5, 1.0, len(pts)), c.px(7))
    sp = sp * (0.7 + 0.3 * np.clip(smooth_noise(c.rng, c.shape, c.px(5)), -1, 1))
    return (np.clip(sp, 0, 1.2) + 0.1) * c.nf


def _p_nuclear_bodies(c: Ctx) -> np.ndarray:
    k = int(c.rng.integers(2, 8))
    pts = _sample_points(c.rng, c.nuclear_interior(c.px(6)), k)
    return np.clip(_spots(c.shape, pts, c.rng.uniform(0.8, 1.0, len(pts)), c.px(6)), 0, 1.2) * c.nf


def _p_er(c: Ctx) -> np.ndarray:
    return c.yellow * (0.9 + 0.1 * smooth_noise(c.rng, c.shape, c.px(10)))


def _p_golgi(c: Ctx) -> np.ndarray:
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


def _p_intermediate_filaments(c: Ctx) -> np.ndarray:
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


def _p_actin(c: Ctx) -> np.ndarray:
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


def _p_microtubules(c: Ctx) -> np.ndarray:
    return c.red * (0.9 + 0.1 * smooth_noise(c.rng, c.shape, c.px(10)))


def _p_mitotic_spindle(c: Ctx) -> np.ndarray:
    return c.spindle


def _p_centrosome(c: Ctx) -> np.ndarray:
    k = int(c.rng.integers(1, 3))
    pts = c.mtoc[None] + c.rng.normal(0, c.px(5), (k, 2))
    sp = _spots(c.shape, pts, 1.0, c.px(5))
    return np.clip(sp, 0, 1.2) * c.mf + 0.04 * c.cf


def _p_plasma_membrane(c: Ctx) -> np.ndarray:
    band = np.exp(-c.d_edge / max(c.px(7), 0.8))
    return np.clip(1.6 * band * (0.8 + 0.2 * smooth_noise(c.rng, c.shape, c.px(15))), 0, 1.2) * c.mf


def _p_mitochondria(c: Ctx) -> np.ndarray:
    rng = c.rng
    weight = c.perinuclear(0.7 * c.r)
    n = int(rng.integers(150, 260))
    starts = _sample_points(rng, weight, n)
    paths = _random_walks(rng, starts, rng.uniform(0, 2 * math.pi, len(starts)), 3, c.px(rng.uniform(4, 10)), 0.45)
    fil = _draw_paths(c.shape, paths, c.thick(3))
    return np.clip(cv2.GaussianBlur(fil, (0, 0), max(c.px(1.5), 0.5)) * 1.2, 0, 1) * c.cf


def _p_aggresome(c: Ctx) -> np.ndarray:
    rng = c.rng
    anchor = _sample_points(rng, c.perinuclear(0.2 * c.rn) * (c.d_nuc > 0.1 * c.rn), 1)
    if len(anchor) == 0:
        anchor = _sample_points(rng, c.perinuclear(0.2 * c.rn), 1)
    pts = anchor + rng.normal(0, 0.06 * c.rn, (4, 2)) if len(anchor) else anchor
    blob = _spots(c.shape, pts, 1.0, 0.12 * c.rn)
    return np.clip(_norm(blob, 99.9) * 1.3, 0, 1.3) * c.mf * (1.0 - 0.8 * c.nf) + 0.03 * c.cf


def _p_cytosol(c: Ctx) -> np.ndarray:
    tex = 0.8 + 0.2 * smooth_noise(c.rng, c.shape, c.px(40))
    return np.clip(tex, 0, None) * (1.0 - np.exp(-c.d_edge / c.px(20))) * c.cf


def _p_vesicles(c: Ctx) -> np.ndarray:
    rng = c.rng
    n = int(rng.integers(60, 160))
    pts = _sample_points(rng, c.cf * c.vis, n)
    sp = _spots(c.shape, pts, rng.uniform(0.4, 1.0, len(pts)), c.px(4))
    return np.clip(sp, 0, 1.2) * c.cf


def _p_negative(c: Ctx) -> np.ndarray:
    return np.zeros(c.shape, np.float32)


#: class id -> green painter, in the order of :data:`hpa_kernel.classes.CLASS_NAMES`
PATTERNS = dict(enumerate([
    _p_nucleoplasm, _p_nuclear_membrane, _p_nucleoli, _p_fibrillar_center, _p_speckles, _p_nuclear_bodies, _p_er,
    _p_golgi, _p_intermediate_filaments, _p_actin, _p_microtubules, _p_mitotic_spindle, _p_centrosome,
    _p_plasma_membrane, _p_mitochondria, _p_aggresome, _p_cytosol, _p_vesicles, _p_negative,
]))


def paint_blue(c: Ctx) -> np.ndarray:
    chrom = 0.75 + 0.25 * smooth_noise(c.rng, c.shape, c.px(10))
    tex = chrom * (1.0 - 0.5 * c.nucleoli_mask)
    tex = tex * (0.75 + 0.25 * (1.0 - np.exp(-(-np.minimum(c.d_nuc, 0)) / c.px(6))))
    if c.cell.mitotic:
        tex = tex * 1.6
    return np.clip(tex, 0, None) * c.nf

