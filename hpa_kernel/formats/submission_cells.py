"""One submission row as cells: the inverse of ``prediction_string`` + ``encode_label_image``.

A PredictionString lists a cell once per class, its mask string repeated. :func:`row_cells`
turns the row back into cells -- the distinct mask strings in order of first appearance,
an ``(n, 19)`` score matrix, the cells' areas and one label image at the original size --
so that cells of different pipelines can be matched by IoU (:mod:`hpa_kernel.stages.cellmatch`).
The masks are checked and decoded by the codec, :mod:`hpa_kernel.formats.rle`
(``check_masks``, ``decode_label_image``; the latter re-exported here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.submission import parse_prediction_string
from hpa_kernel.formats.rle import check_masks, decode_label_image

__all__ = ["SubmissionCells", "row_scores", "row_cells", "decode_label_image"]

logger = logging.getLogger(__name__)


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
    labels, _ = decode_label_image(masks, int(height), int(width), checked=True)
    return SubmissionCells(masks=masks, scores=scores, areas=areas, labels=labels)
