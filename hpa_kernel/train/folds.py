"""Multilabel-stratified K folds (iterative-stratification) and the per-fold class table.

CLI: ``python -m hpa_kernel.train.folds --csv index.csv [--n-folds 4] [--seed 0]``
adds (or replaces) the ``fold`` column in place and prints the class table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from hpa_kernel.classes import NUM_CLASSES, parse_labels

__all__ = ["FoldError", "label_matrix", "assign_folds", "fold_table", "format_fold_table", "main"]

logger = logging.getLogger(__name__)


class FoldError(ValueError):
    """Folds cannot be made (bad label, too few images, an empty fold)."""


def label_matrix(df: pd.DataFrame, column: str = "Label") -> np.ndarray:
    """One-hot ``(N, 19)`` uint8 matrix of the ``|``-separated label column.

    A class outside 0..18 (or a non-integer token) raises :class:`FoldError`
    naming the row (0-based data row and its ``ID``).
    """
    if column not in df.columns:
        raise FoldError(f"CSV has no {column!r} column (columns: {list(df.columns)})")
    y = np.zeros((len(df), NUM_CLASSES), dtype=np.uint8)
    ids = df["ID"].astype(str).tolist() if "ID" in df.columns else [""] * len(df)
    for i, text in enumerate(df[column].astype(str).tolist()):
        try:
            classes = parse_labels(text)
        except ValueError as e:
            raise FoldError(f"row {i} (ID {ids[i]!r}), Label {text!r}: {e}") from None
        y[i, classes] = 1
    return y


def assign_folds(df: pd.DataFrame, n_folds: int = 4, seed: int = 0) -> pd.DataFrame:
    """Return a copy of ``df`` with an int ``fold`` column (0..n_folds-1).

    Uses ``iterstrat``'s ``MultilabelStratifiedKFold`` (shuffled, seeded) on the
    one-hot labels. Raises :class:`FoldError` if there are fewer images than
    folds or a fold comes out empty.
    """
    if n_folds < 2:
        raise FoldError(f"n_folds must be >= 2, not {n_folds}")
    y = label_matrix(df)
    if len(df) < n_folds:
        raise FoldError(f"{len(df)} image(s) cannot fill {n_folds} folds: every fold would need at least one")
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    folds = np.full(len(df), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(df)), y)):
        folds[val_idx] = k
    counts = np.bincount(folds[folds >= 0], minlength=n_folds)
    empty = [k for k in range(n_folds) if counts[k] == 0]
    if empty or (folds < 0).any():
        raise FoldError(f"fold(s) {empty} came out empty ({len(df)} images, {n_folds} folds): use more images")
    out = df.copy()
    out["fold"] = folds
    return out


def fold_table(df: pd.DataFrame) -> pd.DataFrame:
    """Count of each class per fold: rows = folds (+ ``total``), columns = classes 0..18 + ``images``."""
    if "fold" not in df.columns:
        raise FoldError("CSV has no 'fold' column")
    y = label_matrix(df)
    rows = {}
    for k in sorted(df["fold"].unique()):
        m = (df["fold"] == k).to_numpy()
        rows[int(k)] = list(y[m].sum(0)) + [int(m.sum())]
    rows["total"] = list(y.sum(0)) + [len(df)]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[*range(NUM_CLASSES), "images"])


def format_fold_table(df: pd.DataFrame) -> str:
    """The class table as text (folds as rows), for logs."""
    return "class counts per fold:\n" + fold_table(df).to_string()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.folds", description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path, help="CSV with ID,Label (written back with a fold column)")
    ap.add_argument("--n-folds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        df = assign_folds(pd.read_csv(args.csv), args.n_folds, args.seed)
    except (FoldError, ValueError, OSError) as e:  # a missing or malformed CSV too: one line
        logger.error("%s", e)
        return 2
    df.to_csv(args.out or args.csv, index=False)
    print(format_fold_table(df))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
