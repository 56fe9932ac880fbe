"""One submission row as cells: the inverse of ``prediction_string`` + ``encode_label_image``.

A PredictionString lists a cell once per class, its mask string repeated. :func:`row_cells`
turns the row back into cells -- the distinct mask strings in order of first appearance,
an ``(n, 19)`` score matrix, the cells' areas and one label image at the original size --
so that cells of different pipelines can be matched by IoU (:mod:`hpa_kernel.stages.cellmatch`).

:func:`decode_label_image` decodes many mask strings into one label image without making a
full-size mask per cell: each string's COCO counts are parsed (vectorised over its bytes,
the inverse of pycocotools' ``rleToString``) into runs of the Fortran-order flattening,
and the runs are painted with one fancy assignment. The strings are first checked with
:func:`hpa_kernel.formats.rle.check_masks`, the codec's validator.

(Codec functions: they belong beside ``rle.encode_label_image`` / ``submission.prediction_string``
and may be moved there.)
"""

from __future__ import annotations

import base64
import logging
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.submission import parse_prediction_string
from hpa_kernel.formats.rle import check_masks

__all__ = ["SubmissionCells", "mask_runs", "decode_label_image", "row_scores", "row_cells"]

logger = logging.getLogger(__name__)


def mask_runs(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Foreground runs ``(starts, lengths)`` (int64) of one **valid** mask string.

    Positions index the Fortran-order (column-major) flattening of the mask. The string
    must have passed :func:`hpa_kernel.formats.rle.check_masks`; nothing is re-checked here.
    """
    counts = zlib.decompress(base64.b64decode(text))
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    ends = np.flatnonzero((c & 0x20) == 0)  # last chunk of each value
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    nchunks = ends - starts + 1
    vals = np.zeros(ends.size, dtype=np.int64)
    for k in range(int(nchunks.max())):
        sel = np.flatnonzero(nchunks > k)
        vals[sel] |= (c[starts[sel] + k] & 0x1F) << (5 * k)
    neg = (c[ends] & 0x10) != 0
    vals[neg] -= np.int64(1) << (5 * nchunks[neg])
    # value m (m > 2) is a delta to value m - 2: chains {0}, {1, 3, 5, ...}, {2, 4, 6, ...}
    counts = vals.copy()
    counts[1::2] = np.cumsum(vals[1::2])
    counts[2::2] = np.cumsum(vals[2::2])
    run_end = np.cumsum(counts)
    fg = np.arange(1, counts.size, 2)  # runs alternate background, foreground, ...
    lengths = counts[fg]
    keep = lengths > 0
    return (run_end[fg] - lengths)[keep], lengths[keep]


def decode_label_image(
    texts: Sequence[str], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode mask strings into one ``(height, width)`` int32 label image (a Fortran-ordered
    array, the layout of the RLE; ``np.ascontiguousarray`` makes a C copy if needed).

    Mask ``i`` becomes label ``i + 1``; a pixel covered by several masks goes to the first
    listed. Returns ``(labels, areas)``: ``areas[i]`` is mask i's own pixel count (overlap
    included). Raises ``ValueError`` naming the first string that does not decode at
    ``height x width`` (use :func:`hpa_kernel.formats.rle.check_masks` to filter beforehand).
    """
    areas, errors = check_masks(list(texts), int(height), int(width))
    for i, e in enumerate(errors):
        if e is not None:
            raise ValueError(f"mask {i}: {e}")
    return _paint(texts, int(height), int(width)), areas


def _paint(texts: Sequence[str], h: int, w: int) -> np.ndarray:
    """The label image of :func:`decode_label_image` from strings already checked."""
    n = len(texts)
    flat = np.zeros(h * w, dtype=np.int32)  # Fortran order: flat[x * h + y]
    if n:
        runs = [mask_runs(t) for t in texts]
        starts = np.concatenate([r[0] for r in runs])
        lengths = np.concatenate([r[1] for r in runs])
        owner = np.repeat(np.arange(1, n + 1, dtype=np.int32), [r[0].size for r in runs])
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], (starts + lengths)[order]
        if s.size < 2 or not (s[1:] < np.maximum.accumulate(e)[:-1]).any():
            # disjoint runs: +label at each start, -label at each end, one cumulative sum
            step = np.zeros(h * w + 1, dtype=np.int32)
            np.add.at(step, starts, owner)
            np.add.at(step, starts + lengths, -owner)
            np.cumsum(step[:-1], out=flat)
        else:  # rare: paint the last mask first so that the first listed wins
            logger.debug("masks overlap; overlapped pixels go to the first listed")
            bounds = np.concatenate(([0], np.cumsum([r[0].size for r in runs])))
            for i in range(n - 1, -1, -1):  # one cell's runs at a time, O(its area)
                st, ln = starts[bounds[i] : bounds[i + 1]], lengths[bounds[i] : bounds[i + 1]]
                pix = np.repeat(st - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()), dtype=np.int64)
                flat[pix] = i + 1
    return flat.reshape(w, h).T


@dataclass
class SubmissionCells:
    """The cells of one submission row.

    ``masks[i]`` is cell ``i``'s mask string (label ``i + 1`` in ``labels``), ``scores[i]``
    its 19 class confidences (0 where the row has no line for that class), ``areas[i]``
    its pixel count.
    """

    masks: list[str]
    scores: np.ndarray  # (n, 19) float64
    areas: np.ndarray  # (n,) int64
    labels: np.ndarray  # (height, width) int32


def row_scores(predstring: str) -> tuple[list[str], np.ndarray]:
    """Parse one PredictionString without decoding masks: ``(masks, scores)``.

    ``masks`` are the distinct mask strings in order of first appearance (one per cell),
    ``scores`` ``(n, 19)`` float64 their class confidences (0 where the row has no line;
    a class listed twice for one cell keeps the highest). ``ValueError`` for a malformed
    string (token count, class, confidence).
    """
    triples = parse_prediction_string(predstring or "")
    classes = np.array([t[0] for t in triples], dtype=np.int64)
    conf = np.array([t[1] for t in triples], dtype=np.float64)
    codes, uniques = pd.factorize(pd.Series([t[2] for t in triples], dtype=object), sort=False)
    masks = [str(u) for u in uniques]
    scores = np.zeros((len(masks), NUM_CLASSES), dtype=np.float64)
    if triples:
        np.maximum.at(scores, (codes, classes), conf)
    return masks, scores


def row_cells(predstring: str, width: int, height: int) -> SubmissionCells:
    """Parse and decode one PredictionString at ``width x height``.

    The cells of :func:`row_scores`, each distinct mask string decoded once into one label
    image. Cells whose mask is malformed or empty are dropped with a warning.
    """
    masks, scores = row_scores(predstring)
    areas, errors = check_masks(masks, int(height), int(width))
    good = np.array([e is None for e in errors], dtype=bool) & (areas > 0)
    if not good.all():
        bad = [errors[i] or "empty mask" for i in np.flatnonzero(~good)]
        logger.warning("%d cell mask(s) dropped (%s)", len(bad), bad[0])
        keep = np.flatnonzero(good)
        masks = [masks[i] for i in keep]
        scores, areas = scores[keep], areas[keep]
    labels = _paint(masks, int(height), int(width))
    return SubmissionCells(masks=masks, scores=scores, areas=areas, labels=labels)
