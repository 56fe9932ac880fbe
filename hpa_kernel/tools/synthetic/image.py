"""One synthetic image: the cells, which classes each shows, the painted channels and the
camera, with its per-cell truth (:func:`make_image` -> :class:`SyntheticImage`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES
from hpa_kernel.tools.synthetic.acquire import acquire
from hpa_kernel.tools.synthetic.cells import Cell, fit_nuclei, keep_main_component, make_cells, place_seeds, rasterise
from hpa_kernel.tools.synthetic.patterns import PATTERNS, Ctx, paint_blue

REF_SIDE = 2048.0
"""Side (px) of the reference field of view; every length is in reference px."""

# Relative frequency of the 18 positive classes when drawing random image labels:
# roughly the square root of the HPA train-set frequencies, so that rare classes still
# appear in small synthetic sets.
_CLASS_WEIGHTS = np.array(
    [6.0, 2.0, 3.0, 2.2, 2.2, 2.2, 2.0, 3.0, 2.0, 1.8, 1.5, 1.0, 2.0, 2.5, 2.8, 1.0, 4.0, 2.8],
    dtype=float,
)


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


def _assign_classes(rng: np.random.Generator, cells: list[Cell], areas: np.ndarray, requested: list[int]) -> None:
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


def make_image(rng: np.random.Generator, height: int, width: int, image_labels: list[int] | None = None,
               depth: int = 8, n_cells: int | None = None) -> SyntheticImage:
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
    # the canvas extends beyond the image so that border cells are whole: their
    # edge-dependent textures stay right, and the border cuts them, not the canvas
    pad = int(math.ceil(240 * s)) + 4
    seeds, inside = place_seeds(rng, height, width, max(int(n_cells), 0), 90.0 * s, s)
    cells = make_cells(rng, seeds + pad, inside, s)
    _divide(rng, cells, requested)
    fit_nuclei(cells)
    owner, nuclei = rasterise(rng, cells, (height + 2 * pad, width + 2 * pad), s)
    boxes = keep_main_component(owner, nuclei, len(cells))

    crop = (slice(pad, pad + height), slice(pad, pad + width))
    keep, areas = _visible_cells(cells, owner, nuclei, crop)
    lut = np.zeros(len(cells) + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    kept = [cells[i - 1] for i in keep]
    _assign_classes(rng, kept, areas, requested)
    img = _paint(rng, cells, keep, boxes, owner, nuclei, crop, s)
    cell_classes = {j + 1: list(c.classes) for j, c in enumerate(kept)}
    return SyntheticImage(
        rgby=acquire(rng, img, depth, s),
        cell_labels=lut[owner[crop]],
        nuclei_labels=lut[nuclei[crop]],
        cell_classes=cell_classes,
        image_labels=sorted({k for v in cell_classes.values() for k in v}),
    )


def _divide(rng: np.random.Generator, cells: list[Cell], requested: list[int]) -> None:
    """Make some in-image cells dividing (round, with a condensed metaphase plate), in
    place: at least one for the mitotic-spindle class (11), now and then one anyway."""
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


def _visible_cells(cells: list[Cell], owner: np.ndarray, nuclei: np.ndarray,
                   crop: tuple[slice, slice]) -> tuple[list[int], np.ndarray]:
    """The labels (1-based) of the cells that survive the crop to the image, in raster
    order of their nucleus centres (the order of the final labels), and their visible areas.

    A cell survives when its nucleus and its body show, and its nucleus centre is in the
    image or at least 30 % of its nucleus is.
    """
    n = len(cells)
    nuc_full = np.bincount(nuclei.ravel(), minlength=n + 1)
    nuc_vis = np.bincount(nuclei[crop].ravel(), minlength=n + 1)
    cell_vis = np.bincount(owner[crop].ravel(), minlength=n + 1)
    keep = [
        i
        for i in range(1, n + 1)
        if nuc_vis[i] > 0 and cell_vis[i] > 0 and (cells[i - 1].inside or nuc_vis[i] >= 0.3 * nuc_full[i])
    ]
    keep.sort(key=lambda i: (round(cells[i - 1].y), round(cells[i - 1].x)))
    return keep, cell_vis[keep].astype(float)


def _paint(rng: np.random.Generator, cells: list[Cell], keep: list[int], boxes: list, owner: np.ndarray,
           nuclei: np.ndarray, crop: tuple[slice, slice], s: float) -> np.ndarray:
    """The (H, W, 4) float32 RGBY image of the ``keep`` cells, before the camera.

    Painted cell by cell on bounding boxes of the padded canvas (so that cells cut by the
    border keep their true edges), adding only what is in the image (``crop``).
    """
    ys, xs = crop
    img = np.zeros((ys.stop - ys.start, xs.stop - xs.start, 4), np.float32)
    g_img = rng.uniform(0.45, 1.0)  # expression level of the image's protein
    for i in keep:
        sl = boxes[i - 1]
        c = cells[i - 1]
        # intersection of the box with the image, in box and image coordinates (never
        # empty: a kept cell has pixels in the image and its box contains them)
        y0, y1 = max(sl[0].start, ys.start), min(sl[0].stop, ys.stop)
        x0, x1 = max(sl[1].start, xs.start), min(sl[1].stop, xs.stop)
        box = (slice(y0 - sl[0].start, y1 - sl[0].start), slice(x0 - sl[1].start, x1 - sl[1].start))
        ctx = Ctx(rng, c, sl, owner[sl] == i, nuclei[sl] == i, s, visible=box)
        red = ctx.red * rng.lognormal(0.0, 0.25) * 0.7
        yellow = ctx.yellow * rng.lognormal(0.0, 0.25) * 0.65
        blue = paint_blue(ctx) * rng.lognormal(0.0, 0.2) * 0.7
        green = np.zeros(ctx.shape, np.float32)
        for k in c.classes:
            green += PATTERNS[k](ctx) * rng.uniform(0.6, 1.0)
        green *= g_img * np.clip(rng.lognormal(0.0, 0.35), 0.5, 2.0) * 0.75  # per-cell level
        dst = img[y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start]
        for ch, tex in enumerate((red, green, blue, yellow)):
            dst[..., ch] += tex[box]
    return img
