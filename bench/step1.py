"""Step 1 benchmark: vectorised ``step1_scores`` vs a straightforward per-class, per-cell loop.

    python bench/step1.py [--cells 40] [--size 512] [--cam 32]
                          [--kind uniform|smooth|plateau] [--repeats 3] [--seed 0] [--floor]

Both run on the same inputs (random Voronoi cells, random CAMs — uniform noise, smooth
blobs like real CAMs, or maps with flat parts — and random probabilities);
the script asserts identical numbers (allclose, atol 1e-6) and prints best-of-N times.
``step1_scores_reference`` is also the oracle of ``tests/test_step1.py``.

``--tiles`` prints how much a non-materialising method could skip: the share of cell
pixels whose CAM tile (the output pixels between the same four CAM pixels) cannot be
excluded by its bilinear bounds, even knowing each cell's exact quantile.

``--floor`` also times, on the same inputs, the least work any exact numpy Step 1 has
to do (see :func:`numpy_floor`) and prints the best ratio that floor allows.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES
from hpa_kernel.stages.step1 import step1_scores


def numpy_floor(cams, probs, labels, quantile: float = 0.99, repeats: int = 3, seed: int = 0) -> dict:
    """Least work of any exact Step 1 in numpy on these inputs, timed part by part (ms).

    * ``planes``: each examined class map resized to the labels once (``cv2.resize``) and
      one pass over it (a compare against the image quantile, ``flatnonzero`` of the
      ~1 % kept): the least an exact method that materialises the planes does.
    * ``image``: the whole-image quantile, a ``np.partition`` of its top values per class.
    * ``cells``: the per-cell quantiles: the ``need = n - floor(q (n - 1))`` top values of
      every (cell, class) must be ordered; the faster of one packed ``uint64`` sort of all
      of them and one ``np.partition`` per (cell, class).

    Not a proof: the selection parts assume the top values were already found for free,
    so the true cost of any method of this kind is higher.
    """
    H, W = labels.shape
    maps = np.ascontiguousarray(cams[np.asarray(probs) > 0.01], dtype=np.float32)
    k = len(maps)
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    need = counts - np.floor(quantile * (counts - 1)).astype(np.int64)
    P = H * W
    need_img = P - int(np.floor(quantile * (P - 1)))
    planes = [cv2.resize(m, (W, H), interpolation=cv2.INTER_LINEAR) for m in maps]
    thr = [np.quantile(v, quantile) for v in planes]

    def materialise():
        for c in range(k):
            v = cv2.resize(maps[c], (W, H), interpolation=cv2.INTER_LINEAR)
            np.flatnonzero(v >= thr[c])

    tops = [np.sort(v.ravel())[-need_img:].copy() for v in planes]
    rng = np.random.default_rng(seed)
    rng.shuffle(tops[0]) if tops else None
    group_vals = [rng.random(int(m), dtype=np.float32) for m in np.tile(need, k)]
    keys = np.concatenate([(np.uint64(g) << np.uint64(32)) | v.view(np.uint32).astype(np.uint64)
                           for g, v in enumerate(group_vals)]) if group_vals else np.zeros(0, np.uint64)
    rng.shuffle(keys)
    t_planes, _ = _best(materialise, repeats)
    t_image, _ = _best(lambda: [np.partition(t, 0) for t in tops], repeats)
    t_sort, _ = _best(lambda: np.sort(keys), repeats)
    t_part, _ = _best(lambda: [np.partition(v, 0) for v in group_vals], repeats)
    return {"planes": t_planes * 1e3, "image": t_image * 1e3, "cells_sort": t_sort * 1e3,
            "cells_partition": t_part * 1e3, "values": int(len(keys)), "classes": k}


def tile_share(cams, probs, labels, quantile: float = 0.99) -> float:
    """Share of cell pixels, over examined classes, that lie in CAM tiles whose maximum
    reaches the cell's exact quantile (values equal to the map's minimum excepted: those
    can be counted). A method bounding values per tile must evaluate at least these."""
    H, W = labels.shape
    h, w = cams.shape[1:]
    # output pixel -> left source pixel of its bilinear pair, as cv2 (clamped at borders)
    ty = np.clip(np.floor((np.arange(H) + 0.5) * h / H - 0.5).astype(int), -1, h - 1) + 1
    tx = np.clip(np.floor((np.arange(W) + 0.5) * w / W - 0.5).astype(int), -1, w - 1) + 1
    tile = (ty[:, None] * (w + 1) + tx[None, :]).ravel()
    flat = labels.ravel()
    fg = flat > 0
    must, total = 0, 0
    for c in np.flatnonzero(np.asarray(probs) > 0.01):  # analysis only
        pad = np.pad(cams[c], 1, mode="edge")
        hi = np.maximum.reduce([pad[:-1, :-1], pad[:-1, 1:], pad[1:, :-1], pad[1:, 1:]]).ravel()
        v = cv2.resize(np.ascontiguousarray(cams[c]), (W, H), interpolation=cv2.INTER_LINEAR).ravel()
        ids = np.unique(flat[fg])
        q = np.array([np.quantile(v[flat == i], quantile) for i in ids])
        q_pix = np.zeros(int(flat.max()) + 1)
        q_pix[ids] = q
        floor = cams[c].min()
        need = fg & (hi[tile] >= q_pix[flat]) & ~((q_pix[flat] == floor) & (hi[tile] == floor))
        must += int(need.sum())
        total += int(fg.sum())
    return must / max(total, 1)


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
    ap.add_argument("--floor", action="store_true", help="also time the least work of any exact numpy Step 1")
    ap.add_argument("--tiles", action="store_true", help="also print the share of pixels CAM-tile bounds cannot skip")
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
    if args.floor:
        f = numpy_floor(cams, probs, labels, repeats=args.repeats, seed=args.seed)
        cells = min(f["cells_sort"], f["cells_partition"])
        total = f["planes"] + f["image"] + cells
        print(f"least work of any exact numpy Step 1 on these inputs ({f['classes']} classes, best of {args.repeats}):")
        print(f"  resize each map + one pass over its plane:   {f['planes']:8.2f} ms")
        print(f"  image quantiles (partition of the top 1 %):  {f['image']:8.2f} ms")
        print(f"  cell quantiles, order {f['values']} top values:  {cells:8.2f} ms  "
              f"(sort {f['cells_sort']:.2f}, partition per group {f['cells_partition']:.2f})")
        print(f"  floor {total:.2f} ms -> best possible speed-up {t_ref / (total / 1e3):.1f}x "
              f"(vectorised reaches {t_ref / t_vec:.1f}x)")
    if args.tiles:
        print(f"CAM-tile bounds, each cell's exact quantile known: {tile_share(cams, probs, labels):.0%} "
              "of cell pixels still have to be evaluated")


if __name__ == "__main__":
    main()
