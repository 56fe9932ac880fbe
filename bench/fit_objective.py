"""Which image-label objective of ``train.fit_weights`` tracks the per-cell truth?

    python bench/fit_objective.py --oof DIR [DIR ...] --truth DIR [--splits 10] [--grid 21]

Real HPA training data has image labels only, so ``fit_weights`` without ``--truth``
fits the Step 1 / Step 2 weights on an image-label objective (``--objective``). On a
synthetic validation fold, where per-cell truth exists, this prints

1. over the grid of ``w1`` (one pair), each objective's mAP beside the per-cell-truth
   local mAP and their Spearman rank correlation (does the objective rise where the
   truth rises?), and the ``w1`` each one picks;
2. out of half: the fold's images split in two at random (``--splits`` times, both ways),
   weights fitted on one half (by the per-cell truth, by each image-label objective, or
   left at 0.5/0.5), scored by the per-cell truth on the other half (images the fit did
   not see). A half where an objective cannot be fitted (``fit_weights`` would refuse it)
   keeps 0.5/0.5 and is counted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hpa_kernel.train.fit_weights import OBJECTIVES, fit_step_weights, match_oof, read_oof


def _truth_map(m, w1) -> float:
    return float(m.class_aps(w1, 1 - np.asarray(w1), m.classes()).mean())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() and rb.std() else float("nan")


def grid_table(table, truth: Path, grid: int) -> None:
    w = np.round(np.linspace(0, 1, grid), 6)
    truth_m = match_oof(table, truth)
    truth_curve = np.array([_truth_map(truth_m, x) for x in w])
    print(f"whole fold ({table['ID'].nunique()} images, {len(table)} cells), one pair w1 over {grid} points:")
    print(f"  {'objective':20s} {'w1 picked':>9s} {'truth mAP there':>15s} {'Spearman vs truth':>17s}")
    print(f"  {'per-cell truth':20s} {w[np.argmax(truth_curve)]:9.2f} {truth_curve.max():15.4f} {1.0:17.3f}")
    for obj in OBJECTIVES:
        try:
            fit = fit_step_weights(match_oof(table, None, objective=obj), grid=grid)
        except ValueError as e:
            print(f"  {obj:20s} refused: {e}")
            continue
        curve = fit["ap"].mean(axis=1)
        at = int(np.flatnonzero(w == fit["step1"])[0])
        print(f"  {obj:20s} {fit['step1']:9.2f} {truth_curve[at]:15.4f} {_spearman(curve, truth_curve):17.3f}")
    print(f"  (0.5/0.5: truth mAP {truth_curve[np.flatnonzero(w == 0.5)[0]]:.4f})")
    labels = table.groupby("ID")["Label"].first().astype(str)
    print(f"  images with a single label: {int((~labels.str.contains('|', regex=False)).sum())} of {len(labels)}")


def out_of_half(table, truth: Path, grid: int, splits: int) -> None:
    ids = np.array(sorted(table["ID"].unique()))
    rng = np.random.default_rng(0)
    fitters = {"per-cell truth": None, **{obj: obj for obj in OBJECTIVES}}
    res = {"0.5/0.5": []} | {f"{k}, {kind}": [] for k in fitters for kind in ("pair", "per class")}
    refused = dict.fromkeys(fitters, 0)
    for _ in range(splits):
        half = set(rng.permutation(ids)[: len(ids) // 2])
        inside = table["ID"].isin(half)
        for fit_part, test_part in ((table[inside], table[~inside]), (table[~inside], table[inside])):
            mt = match_oof(test_part, truth)
            res["0.5/0.5"].append(_truth_map(mt, 0.5))
            for name, obj in fitters.items():
                try:
                    mf = match_oof(fit_part, truth if obj is None else None, objective=obj or "images")
                    pair = fit_step_weights(mf, grid=grid)["step1"]
                    per = np.asarray(fit_step_weights(mf, grid=grid, per_class=True)["step1"])
                except ValueError:
                    refused[name] += 1
                    pair, per = 0.5, np.full(19, 0.5)
                res[f"{name}, pair"].append(_truth_map(mt, pair))
                res[f"{name}, per class"].append(_truth_map(mt, per))
    n = len(res["0.5/0.5"])
    print(f"out of half ({splits} random halvings x 2): fitted on one half, per-cell truth local mAP "
          f"of the other half, mean (std) over {n} fits:")
    base = np.asarray(res["0.5/0.5"])
    for k, v in res.items():
        d = np.asarray(v) - base
        extra = "" if k == "0.5/0.5" else f"   vs 0.5/0.5 {d.mean():+.4f}, better in {np.mean(d > 0):.0%}"
        print(f"  {k:32s} {np.mean(v):.4f} ({np.std(v):.4f}){extra}")
    print("  fits refused (kept 0.5/0.5): " + ", ".join(f"{k} {v}" for k, v in refused.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oof", type=Path, required=True, nargs="+", help="train.oof export folder(s)")
    p.add_argument("--truth", type=Path, required=True)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--grid", type=int, default=21)
    a = p.parse_args()
    table = read_oof(a.oof)
    grid_table(table, a.truth, a.grid)
    out_of_half(table, a.truth, a.grid, a.splits)


if __name__ == "__main__":
    main()
