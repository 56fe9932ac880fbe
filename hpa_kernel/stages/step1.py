"""Step 1 — CAM ∩ cells: per-cell class confidences from the image-level class maps.

DESIGN.md 2.3. For every class ``c`` with image probability ``p_c > min_prob`` the class
activation map ``CAM_c`` (``(h, w)``, in [0, 1]) is resized to the label image
(``cv2.INTER_LINEAR``) and every cell gets::

    conf[i, c] = clip(q(CAM_c inside cell i) * p_c / q(CAM_c over the whole image), 0, p_c)

kept only when ``conf / p_c > min_ratio``. ``q`` is the ``quantile`` (0.99) with numpy's
default ``"linear"`` definition: for ``n`` values sorted ascending ``a[0..n-1]``,
``v = quantile * (n - 1)``, ``lo = floor(v)``, ``hi = min(lo + 1, n - 1)``,
``q = lerp(a[lo], a[hi], v - lo)`` (numpy's ``_lerp``).

How the per-cell quantiles are computed for all cells and classes at once (no loop over
cells, no full-size mask per cell; see :func:`grouped_quantiles`): every pixel gets its
cell's row index once; only values at or above each cell's rank ``lo`` matter (about 1 %),
so a threshold per (cell, class) is guessed from a strided subsample, one vectorised pass
keeps the values above it, exact counts prove each guess (or that cell/class is redone
without a threshold), and the few kept values are sorted once by packed
``(cell, class, value)`` keys; ranks are then read off by index arithmetic. The result
equals ``np.quantile`` on the same values (``bench/step1.py`` has the straightforward
reference, also the tests' oracle).
"""

from __future__ import annotations

import cv2
import numpy as np

from hpa_kernel.classes import NEGATIVE, NUM_CLASSES
from hpa_kernel.stages.labels import cell_index, present_ids

__all__ = ["step1_scores", "resize_maps", "grouped_quantiles"]

_BUCKETS = 256
_MAX_PLANE_BYTES = 128 << 20  # resized maps held at once (19 x 512² float32 = 20 MB)
_MAX_HIST_BINS = 1 << 22  # (class, cell, bucket) histogram of the threshold guess


def _to_numpy(x) -> np.ndarray:
    """Accept numpy arrays or (CPU/GPU) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``(k, h, w)`` maps to class-major ``(k, height * width)`` float32 (``cv2.INTER_LINEAR``).

    One ``cv2.resize`` per map: each output (1 MB at 512²) stays in cache for the work
    that follows, which matters more on a busy machine than the call overhead.
    """
    maps = np.asarray(maps, dtype=np.float32)
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for c in range(maps.shape[0]):  # written in place: no copy of each plane
        cv2.resize(np.ascontiguousarray(maps[c]), (width, height), dst=out[c], interpolation=cv2.INTER_LINEAR)
    return out.reshape(maps.shape[0], height * width)


def _ordered_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (sign-magnitude flip)."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    neg = (u >> np.uint32(31)).astype(bool)
    return np.where(neg, ~u, u | np.uint32(0x80000000))


def _from_ordered_bits(u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_ordered_bits`."""
    u = np.asarray(u, dtype=np.uint32)
    pos = (u >> np.uint32(31)).astype(bool)
    return np.where(pos, u & np.uint32(0x7FFFFFFF), ~u).astype(np.uint32).view(np.float32)


def _rank_positions(n: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy ``"linear"`` quantile positions for group sizes ``n`` (n >= 1): lo, hi, gamma."""
    n = np.asarray(n, dtype=np.int64)
    v = quantile * (np.maximum(n, 1) - 1).astype(np.float64)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n, 1) - 1)
    return lo, hi, v - lo


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (``numpy.lib._function_base_impl._lerp``)."""
    d = b - a
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t)


def _select_sorted(
    keys_group: np.ndarray, values: np.ndarray, n_groups: int, rank: np.ndarray
) -> np.ndarray:
    """``rank[g, j]``-th smallest (0-based) value of each group ``g``, float32 ``(n_groups, j)``.

    ``keys_group`` (m,) group of each value. One sort of packed ``(group, ordered float
    bits)`` uint64 keys. Ranks beyond a group's values give unspecified numbers (the
    caller masks them); no values at all give zeros.
    """
    if len(values) == 0:
        return np.zeros(rank.shape, dtype=np.float32)
    packed = (keys_group.astype(np.uint64) << np.uint64(32)) | _ordered_bits(values).astype(np.uint64)
    packed.sort()
    start = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys_group, minlength=n_groups), out=start[1:])
    pos = np.minimum(start[:n_groups, None] + rank, len(packed) - 1)
    bits = (packed[pos] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return _from_ordered_bits(bits)


def _guess_thresholds(
    sub: np.ndarray,
    gsub: np.ndarray,
    n_groups: int,
    need: np.ndarray,
    need_all: int,
    bounds: np.ndarray,
    stride: int,
    buckets: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds expected to leave at least ``need`` values above them, per class and
    group (and per class over all values), guessed from a strided subsample.

    Args:
        sub: ``(k, s)`` subsample of every class plane; ``gsub`` ``(s,)`` their groups.
        need: ``(n_groups,)`` values wanted at or above the threshold; ``need_all`` for all.
        bounds: ``(k, 2)`` min/max per class: the range of the ``buckets`` coarse buckets.

    One histogram per (class, group); the chosen edge has about ``1.5 * need / stride``
    (+ margin) subsample values above it. Only a guess: the caller proves it on the full
    data and falls back to ``-inf`` where it was too high.
    Returns ``(T (k, n_groups), T_all (k,))`` float32.
    """
    k = sub.shape[0]
    G = n_groups + 1
    buckets = int(max(16, min(buckets, _MAX_HIST_BINS // (k * G))))  # many cells: coarser
    lo_v = bounds[:, 0].astype(np.float64)
    span = bounds[:, 1].astype(np.float64) - lo_v
    scale = np.where(span > 0, buckets / np.where(span > 0, span, 1.0), 0.0)
    b = ((sub - lo_v[:, None].astype(np.float32)) * scale[:, None].astype(np.float32)).astype(np.int32)
    np.clip(b, 0, buckets - 1, out=b)
    b += (np.arange(k, dtype=np.int32)[:, None] * G + gsub[None, :]) * buckets
    hist = np.bincount(b.ravel(), minlength=k * G * buckets).reshape(k, G, buckets)
    edges = lo_v[:, None] + np.arange(buckets)[None, :] / np.where(scale > 0, scale, 1.0)[:, None]  # (k, B)

    def pick(h: np.ndarray, want: np.ndarray) -> np.ndarray:
        # h (k, m, B) histograms, want (m,) -> (k, m) thresholds
        want_sub = want / stride
        want_sub = 1.5 * want_sub + 3.0 * np.sqrt(want_sub) + 2.0
        from_top = np.cumsum(h[..., ::-1], axis=-1)[..., ::-1]  # values at or above each bucket
        b_thr = (from_top >= want_sub[None, :, None]).sum(axis=-1) - 1  # highest bucket with enough
        e = np.take_along_axis(edges, np.maximum(b_thr, 0), axis=1)
        return np.where(b_thr > 0, e, -np.inf).astype(np.float32)

    T = pick(hist[:, :n_groups], need.astype(np.float64))
    T_all = pick(hist.sum(axis=1, keepdims=True), np.array([float(need_all)]))[:, 0]
    return T, T_all


def grouped_quantiles(
    values: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    quantile: float = 0.99,
    bounds: np.ndarray | None = None,
    stride: int = 7,
    buckets: int = _BUCKETS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group and whole-row quantiles of every row of ``values``, exactly as ``np.quantile``.

    Args:
        values: class-major ``(k, P)`` finite float32: one row per class, one column per pixel.
        group: ``(P,)`` int group of each pixel in ``0..n_groups``; ``n_groups`` marks
            pixels in no group (they still count for the whole-image quantile).
        n_groups: number of real groups (cells).
        quantile: in [0, 1].
        bounds: ``(k, 2)`` min/max per row if known (e.g. of the maps before resizing);
            only used to lay out the guessing histogram: the results are exact anyway.
        stride, buckets: subsample step and histogram size used to guess thresholds.

    Returns:
        ``(q_group (n_groups, k) float64, q_all (k,) float64, counts (n_groups,) int64)``;
        empty groups get quantile 0.

    Method, per class (all groups at once, exact): only the values at or above rank
    ``lo`` of each group matter (1 % of them at q = 0.99). A threshold per group is guessed
    from a strided subsample; one vectorised pass keeps the values at or above it (a few
    %); their exact counts prove each guess (``count >= n - lo``, else that group is redone
    without a threshold); the kept values are sorted by packed ``(group, value)`` keys and
    ranks ``lo``/``hi`` are read at ``start + rank - (n - count)``. The whole-image
    quantile is a partition of its own kept values.
    """
    values = np.asarray(values, dtype=np.float32)
    k, P = values.shape
    G = n_groups + 1
    group = np.asarray(group, dtype=np.int32)
    counts_all = np.bincount(group, minlength=G)
    counts = counts_all[:n_groups].astype(np.int64)
    lo, hi, gamma = _rank_positions(counts, quantile)
    la, ha, ga = _rank_positions(np.array([P]), quantile)
    lo_a, hi_a, gamma_a = int(la[0]), int(ha[0]), float(ga[0])
    need = np.where(counts > 0, counts - lo, 0)  # values at or above rank lo, per group
    need_all = P - lo_a
    ok = counts > 0
    if bounds is None:
        bounds = np.stack([values.min(axis=1), values.max(axis=1)], axis=1)
    bounds = np.asarray(bounds, dtype=np.float64)
    T_k, T_all_k = _guess_thresholds(
        values[:, ::stride], group[::stride], n_groups, need, need_all, bounds, stride, buckets
    )
    # runs of equal group along the raster: per-pixel thresholds by np.repeat, not a gather
    run_start = np.flatnonzero(np.diff(group, prepend=-1))
    run_len = np.diff(np.append(run_start, P))
    run_group = group[run_start]
    inf_row = np.float32(np.inf)
    q_group = np.zeros((n_groups, k), dtype=np.float64)
    q_all = np.zeros(k, dtype=np.float64)
    for c in range(k):  # per class: every array below is one image plane (cache-sized)
        v = values[c]
        T, T_all = T_k[c].copy(), np.float32(T_all_k[c])
        # Values equal to the row's minimum ``f`` are counted per group, never sorted:
        # relu maps (many exact zeros), flat maps (every value equal) and plateaus. A
        # bilinear resize of a map whose minimum is ``f`` gives values >= f (convex weights)
        # and exactly ``f`` where all four sources are ``f``; checked, not assumed.
        f = np.float32(bounds[c, 0])
        on_floor = bool(np.isfinite(f)) and v.min() >= f
        n_floor = np.zeros(G, dtype=np.int64)  # values equal to f, per group (+ no group)
        if on_floor:
            off_floor = v != f
            np.maximum(T, f, out=T)
            T_all = max(T_all, f)
        for _attempt in range(2):
            thr = np.empty(G, dtype=np.float32)
            np.minimum(T, T_all, out=thr[:n_groups])
            thr[n_groups] = T_all
            t_min = thr.min()
            if on_floor and t_min <= f and not n_floor.any():  # counted once, when needed
                n_on = P - int(np.count_nonzero(off_floor))
                if 2 * n_on < P:
                    n_floor = np.bincount(group[~off_floor], minlength=G)
                else:
                    n_floor = counts_all - np.bincount(group[off_floor], minlength=G)
            mask = v >= np.repeat(thr[run_group], run_len)  # each pixel's threshold, run by run
            if on_floor:
                mask &= off_floor
            idx = np.flatnonzero(mask)
            vc, gc = v[idx], group[idx]
            in_g = vc >= np.append(T, inf_row)[gc]  # the no-group pixels never
            in_a = vc >= T_all
            z_g = np.where(T <= f, n_floor[:n_groups], 0)  # all 0 unless on_floor
            z_a = int(n_floor.sum()) if on_floor and T_all <= f else 0
            cnt = np.bincount(gc[in_g], minlength=G)[:n_groups] + z_g
            cnt_a = int(np.count_nonzero(in_a)) + z_a
            bad = (cnt < need) & ok
            if not bad.any() and cnt_a >= need_all:
                break
            fallback = f if on_floor else np.float32(-np.inf)  # guessed too high: take all
            T = np.where(bad, fallback, T).astype(np.float32)
            T_all = fallback if cnt_a < need_all else T_all
        if ok.any():
            # rank r of a group: skip the (n - cnt) values below the threshold, then the
            # z_g values equal to f (a negative r lands on them)
            skipped = (counts - cnt)[:, None]
            r = np.stack([lo, hi], axis=1) - skipped - z_g[:, None]
            sel = _select_sorted(gc[in_g], vc[in_g], n_groups, np.maximum(r, 0)).astype(np.float64)
            sel = np.where(r < 0, np.float64(f), sel)
            q_group[:, c] = np.where(ok, _lerp(sel[:, 0], sel[:, 1], gamma), 0.0)
        va = vc[in_a]
        r_a = [lo_a - (P - cnt_a) - z_a, hi_a - (P - cnt_a) - z_a]
        kth = sorted({x for x in r_a if x >= 0})
        part = np.partition(va, kth) if kth else va
        lo_v, hi_v = (np.float64(part[x]) if x >= 0 else np.float64(f) for x in r_a)
        q_all[c] = _lerp(lo_v, hi_v, gamma_a)
    return q_group, q_all, counts


def step1_scores(
    cams,
    probs,
    labels: np.ndarray,
    cell_ids: np.ndarray | None = None,
    min_prob: float = 0.01,
    min_ratio: float = 0.02,
    top_classes: int = 18,
    quantile: float = 0.99,
) -> np.ndarray:
    """Per-cell class confidences from CAMs and image-level probabilities (DESIGN.md 2.3).

    Args:
        cams: ``(19, h, w)`` class activation maps in [0, 1] (numpy or torch).
        probs: ``(19,)`` image-level sigmoid probabilities.
        labels: ``(H, W)`` int label image (0 = background); the CAMs are resized to it.
        cell_ids: ``(n,)`` the cells to score (default: the labels present, ascending).
            Ids absent from ``labels`` are cells without pixels: never given a CAM class.
        min_prob: a class is examined only if ``p_c > min_prob``.
        min_ratio: a (cell, class) is kept only if ``conf / p_c > min_ratio``.
        top_classes: at most this many classes per image (the found classes ranked by
            ``p_c``, ties by class index); the others are zeroed before the Negative rule.
            (The write-up's code ranks by the best cell confidence instead; the two differ
            only when a class's best cell stays below ``p_c``.)
        quantile: the per-cell and per-image quantile (numpy's linear definition).

    Returns:
        ``(n, 19)`` float32, row ``i`` = cell ``cell_ids[i]``, 0 where nothing was kept.

    Negative (class 18), our reading of DESIGN.md (it matches the write-up's code):

    * Negative is examined through its CAM like every other class when ``p_18 > min_prob``.
    * A cell left with no class after the ``top_classes`` cut gets ``conf[i, 18] = p_18``.
    * "When nothing at all was found" = no (cell, class) pair was kept for any cell (before
      the cut). Then every cell gets only Negative, with confidence ``max(p)`` (max over all
      19 probabilities) when the CAM∩cell intersection was *empty*, i.e. at least one class
      passed ``min_prob`` and was intersected with the cells but every pair fell below
      ``min_ratio``; and ``1 - max(p)`` when no class passed ``min_prob`` at all (no CAM
      was intersected: the image looks negative, and the lower ``max(p)``, the surer).

    Edge cases: ``q(image) == 0`` is read as the limit (``conf = p_c`` when the cell's
    quantile is positive, else 0); non-finite CAM values are treated as 0.
    """
    cams = np.nan_to_num(_to_numpy(cams).astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    probs = _to_numpy(probs).astype(np.float64).reshape(-1)
    labels = np.asarray(labels)
    if cams.ndim != 3 or cams.shape[0] != NUM_CLASSES or probs.shape[0] != NUM_CLASSES:
        raise ValueError(f"expected cams (19, h, w) and probs (19,), got {cams.shape} and {probs.shape}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if cell_ids is None:
        cell_ids = present_ids(labels)
    cell_ids = np.asarray(cell_ids).astype(np.int64, copy=False).reshape(-1)
    n = len(cell_ids)
    scores = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    if n == 0:
        return scores

    order = np.argsort(cell_ids, kind="stable")
    sorted_ids = cell_ids[order]
    active = np.flatnonzero(probs > min_prob)
    kept = np.zeros((n, NUM_CLASSES), dtype=bool)
    if len(active):
        H, W = labels.shape
        group_sorted = cell_index(labels, sorted_ids)
        maps = cams[active]
        bounds = np.stack([maps.min(axis=(1, 2)), maps.max(axis=(1, 2))], axis=1)
        q_cell = np.zeros((n, len(active)), dtype=np.float64)
        q_img = np.zeros(len(active), dtype=np.float64)
        chunk = max(1, _MAX_PLANE_BYTES // (4 * H * W))  # bounded memory at any label size
        for c0 in range(0, len(active), chunk):
            q_cell[:, c0 : c0 + chunk], q_img[c0 : c0 + chunk], counts = grouped_quantiles(
                resize_maps(maps[c0 : c0 + chunk], H, W),
                group_sorted,
                n,
                quantile=quantile,
                bounds=bounds[c0 : c0 + chunk],
            )
        # back to the caller's cell order (duplicates in cell_ids share one group)
        first = np.searchsorted(sorted_ids, cell_ids)
        q_cell, counts = q_cell[first], counts[first]
        p = probs[active]
        ratio = np.divide(q_cell, q_img[None, :], out=np.zeros_like(q_cell), where=q_img[None, :] > 0)
        ratio = np.where((q_img[None, :] <= 0) & (q_cell > 0), np.inf, ratio)
        conf = np.clip(ratio * p[None, :], 0.0, p[None, :])
        keep = (conf / p[None, :] > min_ratio) & (counts[:, None] > 0)
        scores[:, active] = np.where(keep, conf, 0.0)
        kept[:, active] = keep

    if not kept.any():
        neg = float(np.nanmax(probs)) if len(active) else 1.0 - float(np.nanmax(probs))
        scores[:, NEGATIVE] = neg
        return scores

    found = np.flatnonzero(kept.any(axis=0))
    if len(found) > top_classes:
        rank = found[np.argsort(-probs[found], kind="stable")]
        drop = rank[max(top_classes, 0) :]
        scores[:, drop] = 0.0
        kept[:, drop] = False
    missing = ~kept.any(axis=1)
    scores[missing, NEGATIVE] = probs[NEGATIVE]
    return scores
