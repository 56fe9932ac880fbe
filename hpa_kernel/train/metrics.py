"""Validation metrics on image-level predictions: macro F1 at a threshold and macro mAP.

Both are averaged over the classes present in the targets (a class with no positive
image has no defined recall or AP). The AP is the competition's
(:func:`hpa_kernel.tools.metric.average_precision`: all-point interpolated, ties keep the
item order), each image one detection and its label the truth: :func:`image_ap`.
"""

from __future__ import annotations

import numpy as np

from hpa_kernel.tools.metric import average_precision

__all__ = ["image_ap", "macro_map", "macro_f1"]


def image_ap(scores: np.ndarray, target: np.ndarray) -> float:
    """Image-level AP of one class with the metric's AP (nan when ``target`` has no positive)."""
    target = np.asarray(target).astype(bool)
    n_pos = int(target.sum())
    return average_precision(scores, target, n_pos) if n_pos else float("nan")


def macro_map(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the classes with at least one positive (nan if none)."""
    aps = [image_ap(probs[:, c], targets[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
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
