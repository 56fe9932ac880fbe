"""What a training run reports beyond ``metrics.csv``: the ETA, the per-class AP of the
validation fold, and ``training.png``.

``training.png`` (loss, F1 and mAP per epoch) needs matplotlib, a train extra
(``pip install -e ".[train]"``); it is imported here only, lazily, and never by
inference. Without it the run goes on and says once that no plot is drawn.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES
from hpa_kernel.train.metrics import image_ap

__all__ = ["eta_text", "class_ap_table", "format_class_ap", "plot_history", "PLOT_NAME", "CLASS_AP_NAME"]

logger = logging.getLogger(__name__)
PLOT_NAME = "training.png"
CLASS_AP_NAME = "val_class_ap.csv"
_warned = False


def eta_text(seconds: Sequence[float], epochs_left: int, now: float | None = None) -> str:
    """``"run ETA 12 min for 3 more epoch(s) (ends about 14:05 UTC)"`` from this session's epoch times."""
    if epochs_left <= 0:
        return "run ETA: this was the last epoch"
    left = float(np.mean(seconds)) * epochs_left
    end = time.gmtime((time.time() if now is None else now) + left)
    span = f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    return f"run ETA {span} for {epochs_left} more epoch(s) (ends about {time.strftime('%H:%M', end)} UTC)"


def class_ap_table(probs: np.ndarray, targets: np.ndarray, epoch: int) -> pd.DataFrame:
    """Image-level AP of each class with positives in ``targets`` (NaN where none)."""
    rows = []
    for c in range(min(NUM_CLASSES, targets.shape[1])):
        n_pos = int(np.asarray(targets[:, c]).astype(bool).sum())
        ap = image_ap(probs[:, c], targets[:, c])
        rows.append({"epoch": epoch, "class": c, "name": CLASS_NAMES[c], "positives": n_pos,
                     "images": len(targets), "ap": ap})
    return pd.DataFrame(rows)


def format_class_ap(table: pd.DataFrame) -> str:
    """The per-class table as log lines, mAP last."""
    width = max(len(n) for n in table["name"])
    lines = [f"{'class':>5}  {'name':<{width}}  {'pos':>5}  {'AP':>6}"]
    for r in table.itertuples(index=False):
        ap = "     -" if math.isnan(r.ap) else f"{r.ap:6.4f}"
        lines.append(f"{r._1:>5}  {r.name:<{width}}  {r.positives:>5}  {ap}")
    lines.append(f"{'':>5}  {'mAP (classes with positives)':<{width}}  {'':>5}  {np.nanmean(table['ap']):6.4f}"
                 if table["ap"].notna().any() else "mAP: no class has a positive image")
    return "\n".join(lines)


def plot_history(history: pd.DataFrame, path: Path) -> Path | None:
    """``training.png``: losses, F1 and mAP per (1-based) epoch; None when matplotlib is missing."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            logger.warning("%s not drawn: matplotlib is not installed (pip install matplotlib, a train extra)",
                           path.name)
            _warned = True
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = history["epoch"]
    for col, label in (("train_loss", "train"), ("val_loss", "val")):
        if history[col].notna().any():
            axes[0].plot(x, history[col], marker="o", label=label)
    for ax, cols, title in ((axes[1], ("val_f1", "val_cell_f1"), "F1 (macro, 0.5)"),
                            (axes[2], ("val_map", "val_cell_map"), "mAP (macro)")):
        for col in cols:
            if col in history and history[col].notna().any():
                ax.plot(x, history[col], marker="o", label="cells" if "cell" in col else "images")
        ax.set_title(title)
    axes[0].set_title("ComboLoss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
