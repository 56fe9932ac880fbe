"""Validation metrics on image-level predictions: macro F1 at a threshold and macro mAP.

Both are averaged over the classes present in the targets (a class with no positive
image has no defined recall or AP). ``average_precision`` matches
``sklearn.metrics.average_precision_score`` (step-wise, no interpolation).
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_precision", "macro_map", "macro_f1"]


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (ties broken by sklearn's rule)."""
    scores = np.asarray(scores, np.float64)
    target = np.asarray(target).astype(bool)
    n_pos = int(target.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], target[order]
    # group tied scores: precision/recall are evaluated only at the end of each tie block
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float((d_recall * precision).sum())


def macro_map(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the classes with at least one positive (nan if none)."""
    aps = [average_precision(probs[:, c], targets[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def macro_f1(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
    """Mean F1 at ``threshold`` over the classes with at least one positive (nan if none)."""
    pred = np.asarray(probs) >= threshold
    t = np.asarray(targets).astype(bool)
    f1s = []
    for c in range(t.shape[1]):
        if not t[:, c].any():
            continue
        tp = float((pred[:, c] & t[:, c]).sum())
        denom = float(pred[:, c].sum() + t[:, c].sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s)) if f1s else float("nan")
