"""Ensembling per cell and class (``docs/METHOD.md``, "Ensemble"): Step 1 × Step 2, then models,
then the one class-selection rule (:func:`select_top_classes`).

Everything works on per-image score matrices ``(n_cells, 19)``; weights are normalised to
sum to 1. Flip TTA is in :mod:`hpa_kernel.stages.model` (``TTA_FLIPS``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["check_weights", "combine_steps", "combine_models", "select_top_classes"]


def check_weights(weights: Sequence[float], n: int, what: str = "input(s)") -> np.ndarray:
    """The one rule for a list of weights (models here, team-merge inputs, cell-match inputs):
    ``n`` of them, finite, ``>= 0`` and not all 0. Returns them as float64 (not normalised);
    ``ValueError`` starting ``weights:`` otherwise."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise ValueError(f"weights: {w.size} given for {n} {what}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights: must be finite, >= 0 and not all 0, got {w.tolist()}")
    return w


def combine_steps(
    s1: np.ndarray | None,
    s2: np.ndarray | None,
    w1: float | Sequence[float] = 0.5,
    w2: float | Sequence[float] = 0.5,
) -> np.ndarray:
    """``(w1 * s1 + w2 * s2) / (w1 + w2)`` per cell and class, float32.

    ``w1`` / ``w2`` are numbers, or one weight per class (length ``s1.shape[1]``; the
    manifest's 19-vectors, :mod:`hpa_kernel.train.fit_weights`), each ``>= 0`` and not
    both 0 for any class. Either score matrix may be ``None`` (that step was not run): the
    other is returned alone (as float32).
    """
    if s1 is None and s2 is None:
        raise ValueError("combine_steps needs at least one of s1, s2")
    if s1 is None or s2 is None:
        return np.asarray(s2 if s1 is None else s1, dtype=np.float32).copy()
    if np.ndim(w1) == 0 and np.ndim(w2) == 0:
        return combine_models([s1, s2], [w1, w2])
    a, b = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"score shapes differ or are not (cells, classes): {a.shape}, {b.shape}")
    v1 = np.broadcast_to(np.asarray(w1, dtype=np.float64), (a.shape[1],))
    v2 = np.broadcast_to(np.asarray(w2, dtype=np.float64), (a.shape[1],))
    total = v1 + v2
    if not (np.all(np.isfinite(total)) and np.all(v1 >= 0) and np.all(v2 >= 0) and np.all(total > 0)):
        raise ValueError(f"per-class step weights must be finite, >= 0 and not both 0: {v1.tolist()}, {v2.tolist()}")
    return ((v1 * a + v2 * b) / total).astype(np.float32)


def combine_models(scores_list: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted average of equally shaped score matrices (default: equal weights), float32."""
    if len(scores_list) == 0:
        raise ValueError("combine_models needs at least one score matrix")
    arrays = [np.asarray(s, dtype=np.float64) for s in scores_list]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"score shapes differ: {[a.shape for a in arrays]}")
    w = check_weights(weights if weights is not None else [1.0] * len(arrays), len(arrays), "score matrices")
    w = w / w.sum()
    return np.tensordot(w, np.stack(arrays, axis=0), axes=1).astype(np.float32)


def select_top_classes(scores: np.ndarray, top_n: int = 18, floor: float = 0.0,
                       starts: np.ndarray | None = None) -> np.ndarray:
    """Keep, for each image, the ``top_n`` classes with the highest max-over-cells score.

    Classes beyond ``top_n`` (ranked by their max over the image's cells, ties by class
    index) are zeroed, and so is every value ``<= floor``. ``scores`` are one image's
    ``(n_cells, n_classes)``, or with ``starts`` the cells of several images (image ``k``'s
    rows begin at ``starts[k]``, increasing; how :mod:`hpa_kernel.train.fit_weights` scores
    a whole fold at once). Returns a new float32 array.
    """
    out = np.array(scores, dtype=np.float32, copy=True)
    if out.ndim != 2:
        raise ValueError(f"scores must be (n_cells, n_classes), got {out.shape}")
    if out.shape[0] and top_n < out.shape[1]:
        starts = np.zeros(1, np.int64) if starts is None else np.asarray(starts, np.int64)
        best = np.maximum.reduceat(out, starts, axis=0)  # (images, classes)
        order = np.argsort(-best, axis=1, kind="stable")
        drop = np.zeros(best.shape, bool)
        np.put_along_axis(drop, order[:, max(int(top_n), 0) :], True, axis=1)
        out[drop[np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(out)]))]] = 0.0
    out[out <= floor] = 0.0
    return out
