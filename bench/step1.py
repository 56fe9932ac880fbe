"""Step 1 benchmark: ``step1_scores`` vs the straightforward per-class, per-cell loop.

    python bench/step1.py [--cells 40] [--size 512] [--cam 32]
                          [--kind uniform|smooth|plateau] [--repeats 3] [--seed 0]

Both run on the same inputs (random Voronoi cells, random CAMs — uniform noise, smooth
blobs like real CAMs, or maps with flat parts — and random probabilities); the script
asserts bit-identical scores and prints best-of-N times and their ratio. The reference,
``step1_scores_reference``, is the tests' oracle and lives with them (``tests/oracles.py``).
There is no speed target: the side-by-side ratio is recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.stages.step1 import step1_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import make_inputs, step1_scores_reference  # noqa: E402 (the tests own them)


def _best(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cam", type=int, default=32)
    ap.add_argument("--kind", choices=("uniform", "smooth", "plateau"), default="uniform")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    cams, probs, labels = make_inputs(args.seed, args.size, args.cells, args.cam, args.kind)
    n_active = int((probs > 0.01).sum())
    print(
        f"labels {args.size}x{args.size}, {len(np.unique(labels)) - 1} cells, "
        f"{(labels > 0).mean():.0%} foreground; CAMs {NUM_CLASSES}x{args.cam}x{args.cam} {args.kind}; "
        f"{n_active} classes with p > 0.01; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    t_ref, ref = _best(lambda: step1_scores_reference(cams, probs, labels), args.repeats)
    t_vec, vec = _best(lambda: step1_scores(cams, probs, labels), args.repeats)
    np.testing.assert_array_equal(vec, ref)
    print(f"reference (per class, per cell, full masks): {t_ref * 1e3:8.1f} ms  (best of {args.repeats})")
    print(f"step1_scores (cells sorted once, np.quantile):{t_vec * 1e3:8.1f} ms  (best of {args.repeats})")
    print(f"ratio: {t_ref / t_vec:.1f}x; bit-identical; {int((ref > 0).sum())} non-zero (cell, class) scores")


if __name__ == "__main__":
    main()
