"""Choose between one step-weight pair and per-class pairs on the validation fold itself.

    python bench/fit_weights_cv.py --oof DIR [DIR ...] [--truth DIR] [--splits 20]

The fitted mAP that ``python -m hpa_kernel.train.fit_weights`` prints is in-sample: the
per-class fit (38 numbers) always wins there. This splits the validation fold's images in
two at random (``--splits`` times), fits on one half and scores on the other (both ways),
and prints the mean out-of-half mAP of: equal weights (0.5/0.5), the fitted pair, and the
fitted per-class pairs. No held-out image is involved: the choice it supports is made
before ``bench/quality.py`` sees the held-out set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hpa_kernel.train.fit_weights import fit_step_weights, match_oof, read_oof


def _map(m, w1: np.ndarray) -> float:
    return float(m.class_aps(w1, 1 - np.asarray(w1), m.classes()).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oof", type=Path, required=True, nargs="+", help="train.oof export folder(s)")
    p.add_argument("--truth", type=Path)
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--grid", type=int, default=21)
    a = p.parse_args()
    table = read_oof(a.oof)
    ids = np.array(sorted(table["ID"].unique()))
    rng = np.random.default_rng(0)
    res = {"0.5/0.5": [], "pair": [], "per class": []}
    for _ in range(a.splits):
        half = set(rng.permutation(ids)[: len(ids) // 2])
        inside = table["ID"].isin(half)
        for fit_part, test_part in ((table[inside], table[~inside]), (table[~inside], table[inside])):
            mf, mt = match_oof(fit_part, a.truth), match_oof(test_part, a.truth)
            pair = fit_step_weights(mf, grid=a.grid)["step1"]
            per = np.asarray(fit_step_weights(mf, grid=a.grid, per_class=True)["step1"])
            res["0.5/0.5"].append(_map(mt, np.full(19, 0.5)))
            res["pair"].append(_map(mt, np.full(19, pair)))
            res["per class"].append(_map(mt, per))
    print(f"{len(ids)} validation images, {a.splits} random halvings x 2 directions; truth: "
          f"{a.truth or 'image labels'}; mean out-of-half local mAP (std):")
    for k, v in res.items():
        print(f"  {k:10s} {np.mean(v):.4f} ({np.std(v):.4f})")
    d = np.asarray(res["per class"]) - np.asarray(res["pair"])
    print(f"  per class - pair: {d.mean():+.4f}, better in {np.mean(d > 0):.0%} of the {len(d)} fits")


if __name__ == "__main__":
    main()
