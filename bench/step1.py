"""Step 1 benchmark: vectorised ``step1_scores`` vs a straightforward per-class, per-cell loop.

    python bench/step1.py [--cells 40] [--size 512] [--cam 32] [--kind uniform|smooth]
                          [--repeats 3] [--seed 0]

Both run on the same inputs (random Voronoi cells, random CAMs — uniform noise or smooth
blobs like real CAMs — and random probabilities);
the script asserts identical numbers (allclose, atol 1e-6) and prints best-of-N times.
``step1_scores_reference`` is also the oracle of ``tests/test_step1.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES
from hpa_kernel.step1 import step1_scores


def step1_scores_reference(
    cams: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    cell_ids: np.ndarray | None = None,
    min_prob: float = 0.01,
    min_ratio: float = 0.02,
    top_classes: int = 18,
    quantile: float = 0.99,
) -> np.ndarray:
    """DESIGN.md 2.3 written the obvious way: a loop over classes and cells, full masks,
    ``np.quantile``. Slow; the oracle for :func:`hpa_kernel.step1.step1_scores`."""
    cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    probs = np.asarray(probs, dtype=np.float64)
    if cell_ids is None:
        cell_ids = [c for c in np.unique(labels) if c != 0]
    cell_ids = list(np.asarray(cell_ids).reshape(-1))
    H, W = labels.shape
    scores = np.zeros((len(cell_ids), NUM_CLASSES), dtype=np.float32)
    kept: dict[int, set[int]] = {i: set() for i in range(len(cell_ids))}
    examined = False
    for c in range(NUM_CLASSES):
        p = probs[c]
        if not p > min_prob:
            continue
        examined = True
        cam = cv2.resize(np.ascontiguousarray(cams[c]), (W, H), interpolation=cv2.INTER_LINEAR)
        q_img = float(np.quantile(cam, quantile))
        for i, cid in enumerate(cell_ids):
            inside = cam[labels == cid]
            if inside.size == 0:
                continue
            q_cell = float(np.quantile(inside, quantile))
            if q_img > 0:
                conf = min(max(q_cell * p / q_img, 0.0), p)
            else:
                conf = p if q_cell > 0 else 0.0
            if conf / p > min_ratio:
                scores[i, c] = conf
                kept[i].add(c)
    if not any(kept.values()):
        top = float(np.nanmax(probs))
        scores[:, NEGATIVE] = top if examined else 1.0 - top
        return scores
    found = sorted({c for cs in kept.values() for c in cs}, key=lambda c: (-probs[c], c))
    for c in found[top_classes:]:
        scores[:, c] = 0.0
        for cs in kept.values():
            cs.discard(c)
    for i, cs in kept.items():
        if not cs:
            scores[i, NEGATIVE] = probs[NEGATIVE]
    return scores


def voronoi_labels(rng: np.random.Generator, size: int, cells: int, radius: float | None = None) -> np.ndarray:
    """Random Voronoi cells (ids 1..cells) with background beyond ``radius`` of any seed."""
    seeds = rng.random((cells, 2)) * size
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    best = np.full((size, size), np.inf, dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.int32)
    for i, (sy, sx) in enumerate(seeds, 1):  # loop over seeds, to make test data only
        d = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = d < best
        best[closer] = d[closer]
        labels[closer] = i
    radius = radius if radius is not None else 0.9 * size / np.sqrt(cells)
    labels[best > radius**2] = 0
    return labels


def make_inputs(seed: int = 0, size: int = 512, cells: int = 40, cam: int = 32, kind: str = "uniform"):
    """``(cams (19, cam, cam), probs (19,), labels (size, size))``; ``kind`` of CAM:
    ``uniform`` noise or ``smooth`` Gaussian blobs (1-3 per class, relu-like zeros)."""
    rng = np.random.default_rng(seed)
    labels = voronoi_labels(rng, size, cells)
    if kind == "uniform":
        cams = rng.random((NUM_CLASSES, cam, cam), dtype=np.float32)
    elif kind == "smooth":
        yy, xx = np.mgrid[:cam, :cam].astype(np.float32)
        cams = np.zeros((NUM_CLASSES, cam, cam), np.float32)
        for c in range(NUM_CLASSES):  # test data only
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.random(2) * cam
                r2 = (0.05 + 0.1 * rng.random()) * cam**2
                cams[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r2)
        cams = np.maximum(cams - 0.1, 0) / np.maximum(cams.max(axis=(1, 2), keepdims=True) - 0.1, 1e-6)
    else:
        raise ValueError(f"unknown CAM kind {kind!r}")
    probs = rng.random(NUM_CLASSES).astype(np.float32)
    return cams, probs, labels


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
    ap.add_argument("--kind", choices=("uniform", "smooth"), default="uniform")
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
    np.testing.assert_allclose(vec, ref, rtol=0, atol=1e-6)
    print(f"reference (per class, per cell, full masks): {t_ref * 1e3:8.1f} ms  (best of {args.repeats})")
    print(f"vectorised step1_scores:                     {t_vec * 1e3:8.1f} ms  (best of {args.repeats})")
    print(f"speed-up: {t_ref / t_vec:.1f}x; max |difference| = {np.abs(vec - ref).max():.2e}; "
          f"{int((ref > 0).sum())} non-zero (cell, class) scores")


if __name__ == "__main__":
    main()
