"""Benchmark: all cells of a label image at once vs one full-size mask per cell.

    python bench/rle.py [--size 2048] [--cells 50] [--repeats 3] [--rows 559]

A 512x512 label image with ~40-60 irregular cells (Voronoi regions of random seeds, cut by a
noisy blob around each seed) is encoded at ``size x size`` two ways:

* all at once: ``hpa_kernel.formats.rle.encode_label_image`` (scale once, runs grouped by label);
* per cell:   for each cell, resize its 512 mask to full size (nearest) and ``encode_mask`` it.

Both are timed side by side, best of ``--repeats``; the outputs must be identical. Then a
``--rows``-image submission (distinct shifted label images, 1-3 classes per cell) is
encoded, written and validated, to time ``validate_submission`` at the scale of the test set.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from hpa_kernel.formats.rle import encode_label_image, encode_mask
from hpa_kernel.formats.submission import prediction_string, validate_submission, write_submission


def make_labels(rng: np.random.Generator, size: int = 512, cells: int = 50) -> np.ndarray:
    """An int32 label image with about ``cells`` irregular, touching or isolated cells."""
    seeds = np.zeros((size, size), np.int32)
    ys, xs = rng.integers(0, size, cells), rng.integers(0, size, cells)
    seeds[ys, xs] = np.arange(1, cells + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    voronoi = seeds[iy, ix]
    noise = ndi.gaussian_filter(rng.standard_normal((size, size)), 6)
    noise /= np.abs(noise).max()
    radius = size * 0.07 * (1.0 + 0.6 * noise)  # irregular blob around each seed
    labels = np.where(dist < radius, voronoi, 0)
    _, inverse = np.unique(labels, return_inverse=True)  # relabel 1..n (0 stays 0)
    return inverse.reshape(labels.shape).astype(np.int32)


def per_cell(labels: np.ndarray, width: int, height: int) -> dict[int, str]:
    """The naive way: one full-size mask per cell."""
    out = {}
    for cid in np.unique(labels[labels > 0]).tolist():
        m = cv2.resize((labels == cid).astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        out[cid] = encode_mask(m)
    return out


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--cells", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=559)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    labels = make_labels(rng, 512, args.cells)
    n = int(labels.max())
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"label image 512x512 with {n} cells -> {args.size}x{args.size}, best of {args.repeats}")

    t_all = t_cell = float("inf")
    for _ in range(args.repeats):  # side by side, so both see the same machine load
        a, fast = best_of(lambda: encode_label_image(labels, args.size, args.size), 1)
        b, slow = best_of(lambda: per_cell(labels, args.size, args.size), 1)
        t_all, t_cell = min(t_all, a), min(t_cell, b)
        assert fast == slow, "outputs differ"
    print(f"all cells at once (encode_label_image): {t_all * 1e3:8.1f} ms")
    print(f"one full-size mask per cell:            {t_cell * 1e3:8.1f} ms")
    print(f"speed-up: {t_cell / t_all:.1f}x   outputs identical: {len(fast)} cells, byte for byte")

    if args.rows <= 0:
        return
    rows = {}
    t0 = time.perf_counter()
    n_triples = n_masks = 0
    for i in range(args.rows):
        shifted = np.roll(labels, (i * 7 % 512, i * 13 % 512), axis=(0, 1))
        rles = encode_label_image(shifted, args.size, args.size)
        ids = np.array(sorted(rles))
        scores = np.zeros((ids.size, 19), np.float32)
        for k in range(1, 4):  # 1-3 classes per cell
            take = rng.random(ids.size) < (1.0 if k == 1 else 0.4)
            scores[take, rng.integers(0, 19, ids.size)[take]] = rng.random(int(take.sum()))
        rows[f"img{i:04d}"] = (args.size, args.size, prediction_string(rles, ids, scores))
        n_masks += len(rles)
        n_triples += int((scores > 0).sum())
    t_encode = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample_submission.csv"
        write_submission({k: (args.size, args.size, "") for k in rows}, list(rows), sample)
        t0 = time.perf_counter()
        out = write_submission(rows, list(rows), Path(tmp) / "submission.csv")
        t_write = time.perf_counter() - t0
        mb = out.stat().st_size / 1e6
        t0, c0 = time.perf_counter(), time.process_time()
        problems = validate_submission(out, sample)
        t_validate, c_validate = time.perf_counter() - t0, time.process_time() - c0
    assert problems == [], problems[:5]
    print(f"submission: {args.rows} rows, {n_masks} masks, {n_triples} triples, {mb:.1f} MB")
    print(f"  encode all rows {t_encode:6.2f} s ({t_encode / args.rows * 1e3:.1f} ms/image)   "
          f"write {t_write:5.2f} s")
    print(f"  validate_submission: {t_validate:5.2f} s wall, {c_validate:5.2f} s CPU (valid)")


if __name__ == "__main__":
    main()
