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

from .classes import NEGATIVE, NUM_CLASSES

__all__ = ["step1_scores", "resize_maps", "grouped_quantiles", "present_ids"]

_CV_MAX_CHANNELS = 512  # cv2.resize handles at most CV_CN_MAX channels at once
_BUCKETS = 64


def _to_numpy(x) -> np.ndarray:
    """Accept numpy arrays or (CPU/GPU) torch tensors."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize ``(k, h, w)`` maps to ``(height * width, k)`` float32 with ``cv2.INTER_LINEAR``.

    All maps go through ``cv2.resize`` together as one ``(h, w, k)`` image, in chunks of
    at most 512 channels (OpenCV's limit).
    """
    maps = np.asarray(maps, dtype=np.float32)
    k = maps.shape[0]
    chunks = []
    for s in range(0, k, _CV_MAX_CHANNELS):
        chunk = np.ascontiguousarray(maps[s : s + _CV_MAX_CHANNELS].transpose(1, 2, 0))
        r = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_LINEAR)
        chunks.append(r.reshape(height * width, chunk.shape[2]))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)


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
    """``rank[j]``-th smallest (0-based, may be an array of columns) value of each group.

    ``keys_group`` (m,) group of each value; every group is assumed to hold more than
    ``rank`` values. One sort of packed ``(group, ordered float bits)`` uint64 keys.
    """
    packed = (keys_group.astype(np.uint64) << np.uint64(32)) | _ordered_bits(values).astype(np.uint64)
    packed.sort()
    start = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys_group, minlength=n_groups), out=start[1:])
    pos = start[:n_groups, None] + rank
    bits = (packed[pos] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return _from_ordered_bits(bits)


def _subsample_thresholds(
    values: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    need: np.ndarray,
    need_all: int,
    lo_v: np.ndarray,
    hi_v: np.ndarray,
    stride: int,
    buckets: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Guess value thresholds that leave at least ``need`` values above them, per group
    and column, from a strided subsample (a histogram of coarse buckets; cheap).

    Only a guess: the caller checks the counts on the full data and falls back to
    ``-inf`` where a guess was too high. Returns ``(T (n_groups, k), T_all (k,))`` float32.
    """
    k = values.shape[1]
    sub = values[::stride]
    gsub = group[::stride]
    lo_v = np.asarray(lo_v, dtype=np.float64)
    span = np.asarray(hi_v, dtype=np.float64) - lo_v
    scale = np.where(span > 0, buckets / np.where(span > 0, span, 1.0), 0.0)
    b = np.clip(((sub - lo_v) * scale).astype(np.int64), 0, buckets - 1)  # (s, k)
    G = n_groups + 1
    key = (gsub.astype(np.int64)[:, None] * k + np.arange(k)) * buckets + b
    hist = np.bincount(key.ravel(), minlength=G * k * buckets).reshape(G, k, buckets)
    edges = lo_v[None, :] + np.arange(buckets)[:, None] / np.where(scale > 0, scale, 1.0)[None, :]  # (B, k)

    def pick(h: np.ndarray, want: np.ndarray) -> np.ndarray:
        # h (..., k, B) subsample counts; want (..., 1) values wanted above the threshold
        # in the full data -> the subsample needs about want / stride, plus a safety margin
        want_sub = want / stride
        want_sub = 1.5 * want_sub + 3.0 * np.sqrt(want_sub) + 2.0
        from_top = np.cumsum(h[..., ::-1], axis=-1)[..., ::-1]  # values at or above bucket
        b_thr = (from_top >= want_sub[..., None]).sum(axis=-1) - 1  # highest bucket with enough
        e = edges.T[np.arange(k), np.maximum(b_thr, 0)]  # (..., k)
        return np.where(b_thr > 0, e, -np.inf).astype(np.float32)

    T = pick(hist[:n_groups], need[:, None].astype(np.float64))
    T_all = pick(hist.sum(axis=0), np.array([float(need_all)]))
    return T, T_all


def grouped_quantiles(
    values: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    quantile: float = 0.99,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    stride: int = 8,
    buckets: int = _BUCKETS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group and whole-array quantiles of every column, exactly as ``np.quantile``.

    Args:
        values: ``(P, k)`` float32, one row per pixel, one column per class.
        group: ``(P,)`` int group of each row in ``0..n_groups``; ``n_groups`` marks rows
            that belong to no group (they still count for the whole-array quantile).
        n_groups: number of real groups.
        quantile: in [0, 1].
        bounds: ``(min, max)`` per column, if known (e.g. of the maps before resizing);
            only used to lay out the guessing histogram: any values are exact.
        stride, buckets: subsample step and histogram size used to guess thresholds.

    Returns:
        ``(q_group (n_groups, k) float64, q_all (k,) float64, counts (n_groups,) int64)``;
        empty groups get quantile 0.

    Method (exact): only the values at or above rank ``lo`` of their group matter. A
    threshold per (group, column) is guessed from a subsample; one pass over the data
    keeps the values at or above it (typically 2-3 % of them); their counts per group
    prove the guess (``count >= n - lo``; otherwise that group is redone without a
    threshold); the kept values are sorted once by packed ``(group, column, value)``
    keys and ranks ``lo``/``hi`` are read off at ``start + rank - (n - count)``.
    """
    P, k = values.shape
    G = n_groups + 1
    counts = np.bincount(group, minlength=G)[:n_groups].astype(np.int64)
    lo, hi, gamma = _rank_positions(counts, quantile)
    lo_a, hi_a, gamma_a = _rank_positions(np.array([P]), quantile)
    need = np.where(counts > 0, counts - lo, 0)  # values at or above rank lo
    need_all = int(P - lo_a[0])
    if bounds is None:
        bounds = (values.min(axis=0), values.max(axis=0))
    T, T_all = _subsample_thresholds(values, group, n_groups, need, need_all, *bounds, stride, buckets)

    for _attempt in range(3):
        thr = np.empty((G, k), dtype=np.float32)
        thr[:n_groups] = np.minimum(T, T_all[None, :])
        thr[n_groups] = T_all
        idx = np.flatnonzero(values >= np.take(thr, group, axis=0))
        col = idx % k
        g = group[idx // k].astype(np.int64)
        vals = values.ravel()[idx]
        in_g = (g < n_groups) & (vals >= T[np.minimum(g, n_groups - 1), col]) if n_groups else np.zeros(len(idx), bool)
        in_a = vals >= T_all[col]
        gc = g[in_g] * k + col[in_g]
        cnt = np.bincount(gc, minlength=n_groups * k).reshape(n_groups, k)
        cnt_a = np.bincount(col[in_a], minlength=k)
        bad = (cnt < need[:, None]) & (counts[:, None] > 0)
        bad_a = cnt_a < need_all
        if not bad.any() and not bad_a.any():
            break
        T = np.where(bad, -np.inf, T).astype(np.float32)  # guessed too high: take all
        T_all = np.where(bad_a, -np.inf, T_all).astype(np.float32)

    q_group = np.zeros((n_groups, k), dtype=np.float64)
    ok = counts > 0
    if ok.any():
        skipped = counts[:, None] - cnt  # values below the threshold, per (group, column)
        ranks = np.stack([lo[:, None] - skipped, hi[:, None] - skipped], axis=-1)  # (n, k, 2)
        ranks = np.where(ok[:, None, None], ranks, 0).reshape(n_groups * k, 2)
        v_g = vals[in_g]
        empty = np.repeat(~ok, k)  # empty groups: one dummy value keeps indexing valid
        if empty.any():
            gc = np.concatenate([gc, np.flatnonzero(empty)])
            v_g = np.concatenate([v_g, np.zeros(int(empty.sum()), np.float32)])
        sel = _select_sorted(gc, v_g, n_groups * k, ranks).astype(np.float64).reshape(n_groups, k, 2)
        q_group = _lerp(sel[..., 0], sel[..., 1], gamma[:, None])
        q_group[~ok] = 0.0

    skipped_a = P - cnt_a
    ranks_a = np.stack([lo_a[0] - skipped_a, hi_a[0] - skipped_a], axis=-1)  # (k, 2)
    sel_a = _select_sorted(col[in_a], vals[in_a], k, ranks_a).astype(np.float64)
    q_all = _lerp(sel_a[:, 0], sel_a[:, 1], gamma_a[0])
    return q_group, q_all, counts


def present_ids(labels: np.ndarray) -> np.ndarray:
    """The non-zero labels present in ``labels``, ascending (bincount, no sort)."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(flat.dtype, np.integer) and flat.min() >= 0:
        ids = np.flatnonzero(np.bincount(flat))
    else:
        ids = np.unique(flat)
    return ids[ids != 0].astype(np.int64)


def _cell_index(labels: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Row index of every pixel's cell in ``cell_ids``; ``len(cell_ids)`` for the rest."""
    n = len(cell_ids)
    flat = labels.ravel()
    if n == 0:
        return np.zeros(flat.shape, dtype=np.int32)
    pos = np.searchsorted(cell_ids, flat)
    pos_c = np.minimum(pos, n - 1)
    hit = (cell_ids[pos_c] == flat) & (flat != 0)
    return np.where(hit, pos_c, n).astype(np.int32)


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
        group_sorted = _cell_index(labels.astype(np.int64, copy=False), sorted_ids)
        maps = cams[active]
        values = resize_maps(maps, H, W)
        q_cell, q_img, counts = grouped_quantiles(
            values, group_sorted, n, quantile=quantile, bounds=(maps.min(axis=(1, 2)), maps.max(axis=(1, 2)))
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
