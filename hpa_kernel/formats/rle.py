"""Masks <-> the competition's mask strings.

A mask string is: COCO RLE of the Fortran-ordered uint8 mask (``pycocotools.mask.encode``,
its ``counts`` bytes) -> ``zlib.compress(level=9)`` -> base64 -> ASCII.

Three entry points:

* :func:`encode_mask` / :func:`decode_mask` -- one binary mask.
* :func:`encode_label_image` -- every cell of a label image at once: the label image is
  scaled to the original size once, its runs (Fortran order) are grouped by label and each
  cell's uncompressed COCO counts are built from them, so no full-size mask per cell is
  ever made. The strings are byte-identical to ``encode_mask(resized == cell_id)``.
* :func:`check_masks` -- validates many mask strings without decoding them to pixels
  (vectorised parse of the COCO counts strings), used by the submission validator and by
  :func:`decode_mask` before handing a string to pycocotools (whose C decoder trusts its
  input: short counts leave uninitialised memory in the mask).
"""

from __future__ import annotations

import base64
import binascii
import logging
import zlib
from typing import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_util

from hpa_kernel.stages.labels import check_size, label_runs, resize_labels

__all__ = [
    "encode_mask",
    "decode_mask",
    "encode_label_image",
    "check_masks",
    "max_counts_length",
    "decode_label_image",
]

logger = logging.getLogger(__name__)

# Longest COCO counts value we accept, in 5-bit chunks: 6 chunks = 30 bits with the sign,
# enough for runs up to 2**29 pixels; pycocotools' C decoder overflows an int beyond that.
_MAX_CHUNKS = 6
# Bytes of COCO counts parsed per vectorised pass in check_masks.
_BATCH_BYTES = 1 << 19


def _pack(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts, 9)).decode("ascii")


def max_counts_length(height: int, width: int) -> int:
    """The longest COCO counts string a mask of ``height x width`` can have: at most
    ``height * width + 1`` runs (a leading empty run, then one per pixel), each at most
    ``_MAX_CHUNKS`` characters. Decompression stops there (a zlib bomb is never inflated)."""
    return _MAX_CHUNKS * (int(height) * int(width) + 1)


def _unpack(text: str, height: int, width: int) -> bytes:
    """base64 -> zlib -> COCO counts bytes, inflating at most :func:`max_counts_length`
    bytes; ``ValueError`` with the layer that failed ("mask too long for WxH" past it)."""
    if not isinstance(text, (str, bytes)):
        raise ValueError(f"mask string must be str, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"mask string is not valid base64 ({e})") from None
    limit = max_counts_length(height, width)
    inflater = zlib.decompressobj()
    try:
        counts = inflater.decompress(raw, limit + 1)
    except zlib.error as e:
        raise ValueError(f"mask string is not zlib-compressed ({e})") from None
    if len(counts) > limit:
        raise ValueError(f"mask too long for {width}x{height} (its runs inflate past {limit} bytes)")
    if not inflater.eof:
        raise ValueError("mask string is not zlib-compressed (incomplete or truncated stream)")
    return counts


def encode_mask(mask: np.ndarray) -> str:
    """Encode one binary mask ``(H, W)`` (nonzero = inside) as a competition mask string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = mask != 0
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return _pack(rle["counts"])


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """Decode a competition mask string into a boolean ``(height, width)`` mask.

    Raises ``ValueError`` naming the fault if the string is not base64, not zlib, not a
    well-formed COCO counts string, or its runs do not cover exactly ``height * width``
    pixels.
    """
    h, w = check_size(height, width)
    counts = _unpack(text, h, w)
    _, errors = _check_counts([counts], np.array([h]), np.array([w]))
    if errors[0] is not None:
        raise ValueError(f"mask string does not decode at {h}x{w}: {errors[0]}")
    m = mask_util.decode({"size": [h, w], "counts": counts})
    return m.astype(bool)


# ----------------------------------------------------------------------------------------
# All cells of a label image at once
# ----------------------------------------------------------------------------------------


def encode_label_image(
    labels: np.ndarray,
    width: int,
    height: int,
    cell_ids: Iterable[int] | np.ndarray | None = None,
) -> dict[int, str]:
    """Encode every cell of a label image as a competition mask string at ``width x height``.

    Parameters
    ----------
    labels:
        ``(h, w)`` integer label image at any size (0 = background), typically 512x512.
    width, height:
        Original image size, as in the CSV columns ``ImageWidth, ImageHeight``.
    cell_ids:
        Labels to encode; default: every nonzero label present in ``labels``. A requested
        label with no pixel at ``width x height`` (absent from ``labels``, or lost by
        downscaling) is left out of the result (the metric drops empty masks and the
        validator rejects them).

    Returns
    -------
    ``{cell_id: mask string}`` in ascending ``cell_id`` order; each string equals
    ``encode_mask(resize_labels(labels, width, height) == cell_id)`` byte for byte
    (:func:`hpa_kernel.stages.labels.resize_labels`).
    """
    h, w = check_size(height, width)
    resized = resize_labels(labels, w, h)
    total = h * w
    starts, lengths, values = label_runs(resized)

    if cell_ids is None:
        wanted = np.unique(values[values != 0]).astype(np.int64)
    else:
        ids = cell_ids if isinstance(cell_ids, np.ndarray) else np.array(list(cell_ids))
        wanted = np.unique(ids.astype(np.int64).ravel())
        if wanted.size and wanted[0] <= 0:
            raise ValueError(f"cell ids must be positive, got {int(wanted[0])}")

    keep = np.isin(values, wanted) if cell_ids is not None else values != 0
    starts, lengths, values = starts[keep], lengths[keep], values[keep].astype(np.int64)
    # Group runs by label; a stable sort keeps each label's runs in flattening order.
    order = np.argsort(values, kind="stable")
    starts, lengths, values = starts[order], lengths[order], values[order]
    present, first, nruns = np.unique(values, return_index=True, return_counts=True)

    # Interleaved counts per cell: [gap0, len0, gap1, len1, ..., trailing background].
    # Slots: 2 per run + 1 trailing per cell; cell g's block starts at 2*first[g] + g.
    ends = starts + lengths
    prev_end = np.empty_like(ends)
    if ends.size:
        prev_end[1:] = ends[:-1]
    prev_end[first] = 0
    cell_of_run = np.repeat(np.arange(present.size), nruns)
    rank = np.arange(starts.size) - first[cell_of_run]
    block = 2 * first + np.arange(present.size)
    pos = block[cell_of_run] + 2 * rank
    counts = np.empty(2 * starts.size + present.size, dtype=np.int64)
    counts[pos] = starts - prev_end
    counts[pos + 1] = lengths
    last_end = ends[first + nruns - 1]
    trailing = total - last_end
    counts[block + 2 * nruns] = trailing
    block_len = 2 * nruns + (trailing > 0)  # pycocotools omits a zero-length final run
    counts = counts.astype(np.uint32)

    uncompressed = [
        {"size": [h, w], "counts": counts[b : b + n]} for b, n in zip(block.tolist(), block_len.tolist())
    ]
    out: dict[int, str] = {}
    if uncompressed:
        compressed = mask_util.frPyObjects(uncompressed, h, w)
        out = {cid: _pack(rle["counts"]) for cid, rle in zip(present.tolist(), compressed)}

    missing = np.setdiff1d(wanted, present)
    if missing.size:
        logger.debug("%d requested cell(s) have no pixel at %dx%d: %s", missing.size, w, h, missing[:10].tolist())
    return out


# ----------------------------------------------------------------------------------------
# Validation of many mask strings without decoding them to pixels
# ----------------------------------------------------------------------------------------


def _flag(errors: list[str | None], bad: np.ndarray, where: np.ndarray, message: str) -> None:
    """Record ``message`` for the strings in ``where`` not yet faulted; mark them bad."""
    for i in np.flatnonzero(where & ~bad).tolist():
        errors[i] = message
    bad |= where


def _parse_counts(counts_list: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list, np.ndarray]:
    """The one COCO counts parser, vectorised over many strings.

    The inverse of pycocotools' ``rleToString``: characters ``48 + 6-bit chunk``, bit 0x20 =
    more chunks follow, bit 0x10 of the last chunk = sign, and from the fourth value on each
    value is a delta to the value two places earlier. Flags empty strings, bad characters,
    truncated and over-long values. Returns ``(runs, first, nvals, errors, bad)``: every
    string's run lengths concatenated (background, foreground, ... alternating; meaningless
    for a flagged string), each string's first run and number of runs, the faults so far.
    """
    n = len(counts_list)
    errors: list[str | None] = [None] * n
    bad = np.zeros(n, dtype=bool)
    lens = np.fromiter((len(c) for c in counts_list), dtype=np.int64, count=n)
    raw = np.frombuffer(b"".join(counts_list), dtype=np.uint8)
    string_start = np.cumsum(lens) - lens  # byte offset of each string
    _flag(errors, bad, lens == 0, "empty RLE counts")
    if raw.size == 0:
        return np.zeros(0, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), errors, bad

    def strings_of(byte_pos: np.ndarray) -> np.ndarray:
        hit = np.zeros(n, dtype=bool)
        hit[np.searchsorted(string_start, byte_pos, side="right") - 1] = True
        return hit

    badchar = np.flatnonzero((raw < 48) | (raw > 111))
    if badchar.size:
        _flag(errors, bad, strings_of(badchar), "RLE counts has a character outside '0'..'o'")
    buf = (raw - np.uint8(48)) & np.uint8(0x3F)  # 6-bit chunks (bad characters already flagged)

    term = (buf & 0x20) == 0
    nonempty = lens > 0
    string_end = (string_start + lens - 1)[nonempty]
    truncated = np.zeros(n, dtype=bool)
    truncated[nonempty] = ~term[string_end]
    _flag(errors, bad, truncated, "RLE counts is truncated (last value has its continuation bit set)")
    term[string_end] = True  # values never span two strings

    tpos = np.flatnonzero(term)  # last byte of each value
    vstarts = np.empty_like(tpos)
    vstarts[0] = 0
    vstarts[1:] = tpos[:-1] + 1
    nchunks = tpos - vstarts + 1
    nvals = np.zeros(n, dtype=np.int64)
    nvals[nonempty] = np.add.reduceat(term, string_start[nonempty], dtype=np.int64)
    too_long = nchunks > _MAX_CHUNKS
    if too_long.any():
        _flag(errors, bad, strings_of(tpos[too_long]), "RLE counts value is too long")
    vals = (buf[vstarts] & 0x1F).astype(np.int64)
    for k in range(1, int(min(nchunks.max(), _MAX_CHUNKS))):
        sel = np.flatnonzero(nchunks > k)
        vals[sel] |= (buf[vstarts[sel] + k] & 0x1F).astype(np.int64) << (5 * k)
    negative = np.flatnonzero((buf[tpos] & 0x10) != 0)
    vals[negative] -= np.int64(1) << (5 * np.minimum(nchunks[negative], _MAX_CHUNKS))

    # Undo the delta coding: value j (j >= 3) += value j-2. Chains per string: {0}, odd j,
    # even j >= 2; a segmented cumulative sum along each chain.
    first = np.concatenate(([0], np.cumsum(nvals)[:-1]))
    j = np.arange(vals.size) - np.repeat(first, nvals)
    # Within a string the members of one chain share the parity of their global index, so
    # each chain is a segment of vals[p::2] starting where j <= 2.
    runs = np.empty_like(vals)
    for p in (0, 1):
        v = vals[p::2]
        if v.size == 0:
            continue
        csum = np.cumsum(v)
        start_idx = np.maximum.accumulate(np.where(j[p::2] <= 2, np.arange(v.size), 0))
        runs[p::2] = csum - (csum[start_idx] - v[start_idx])
    return runs, first, nvals, errors, bad


def _check_counts(
    counts_list: Sequence[bytes], heights: np.ndarray, widths: np.ndarray
) -> tuple[np.ndarray, list[str | None]]:
    """Check many COCO counts strings (:func:`_parse_counts`); return ``(areas, errors)``.

    ``errors[i]`` is ``None`` when string i is well formed and its runs cover exactly
    ``heights[i] * widths[i]`` pixels.
    """
    n = len(counts_list)
    areas = np.zeros(n, dtype=np.int64)
    if n == 0:
        return areas, []
    runs, first, nvals, errors, bad = _parse_counts(counts_list)
    if runs.size == 0:
        return areas, errors
    owner = np.repeat(np.arange(n), nvals)
    j = np.arange(runs.size) - first[owner]
    _flag(errors, bad, np.bincount(owner[(runs < 0) | (runs > np.iinfo(np.uint32).max)], minlength=n) > 0,
          "RLE counts has a negative or overflowing run")
    last = first + nvals
    csum = np.concatenate(([0], np.cumsum(runs)))
    totals = csum[last] - csum[first]
    csum = np.concatenate(([0], np.cumsum(np.where(j % 2 == 1, runs, 0))))
    areas = csum[last] - csum[first]
    expected = heights.astype(np.int64) * widths.astype(np.int64)
    for i in np.flatnonzero((totals != expected) & ~bad).tolist():
        errors[i] = f"RLE runs cover {totals[i]} pixels, expected {heights[i]}x{widths[i]}={expected[i]}"
    bad |= totals != expected
    areas[bad] = 0
    return areas, errors


def check_masks(
    texts: Sequence[str], heights: int | Sequence[int], widths: int | Sequence[int]
) -> tuple[np.ndarray, list[str | None]]:
    """Check many competition mask strings without decoding them to pixels.

    ``heights`` / ``widths`` are one size for all or one per string. Returns
    ``(areas, errors)``: ``errors[i]`` is ``None`` if string i decodes to a mask of its size
    (then ``areas[i]`` is its number of pixels, possibly 0) or a one-line reason otherwise
    (then ``areas[i]`` is 0; a string whose counts would inflate past
    :func:`max_counts_length` of its size is "mask too long for WxH", never inflated). Fast enough for every mask of a submission: the COCO counts
    are parsed in vectorised passes over batches of about ``_BATCH_BYTES`` bytes (batches
    keep the working arrays in cache; one pass over everything is several times slower).
    """
    n = len(texts)
    hs = np.broadcast_to(np.asarray(heights, dtype=np.int64), (n,))
    ws = np.broadcast_to(np.asarray(widths, dtype=np.int64), (n,))
    counts_list: list[bytes] = []
    unpack_errors: dict[int, str] = {}
    for i, text in enumerate(texts):
        try:
            if hs[i] <= 0 or ws[i] <= 0:
                raise ValueError(f"mask size must be positive, got {ws[i]}x{hs[i]}")
            counts_list.append(_unpack(text, hs[i], ws[i]))
        except ValueError as e:
            unpack_errors[i] = str(e)
            counts_list.append(b"")
    areas = np.zeros(n, dtype=np.int64)
    errors: list[str | None] = []
    start, size = 0, 0
    for i, counts in enumerate(counts_list):
        size += len(counts)
        if size >= _BATCH_BYTES or i == n - 1:
            a, e = _check_counts(counts_list[start : i + 1], hs[start : i + 1], ws[start : i + 1])
            areas[start : i + 1] = a
            errors.extend(e)
            start, size = i + 1, 0
    for i, message in unpack_errors.items():
        errors[i] = message
        areas[i] = 0
    return areas, errors


# ----------------------------------------------------------------------------------------
# Many mask strings -> one label image (the merge's decoder)
# ----------------------------------------------------------------------------------------


def decode_label_image(
    texts: Sequence[str], height: int, width: int, checked: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Decode mask strings into one ``(height, width)`` int32 label image (a Fortran-ordered
    array, the layout of the RLE; ``np.ascontiguousarray`` makes a C copy if needed).

    Mask ``i`` becomes label ``i + 1``; a pixel covered by several masks goes to the first
    listed. Returns ``(labels, areas)``: ``areas[i]`` is mask i's own pixel count (overlap
    included). Raises ``ValueError`` naming the first string that does not decode at
    ``height x width`` (use :func:`check_masks` to filter beforehand; ``checked=True`` skips
    the check for strings that passed it, and then ``areas`` is ``None``). No full-size mask
    per cell is made: the strings' runs (:func:`_parse_counts`, positions in the Fortran-order
    flattening) are painted with one cumulative sum.
    """
    h, w = int(height), int(width)
    areas = None
    if not checked:
        areas, errors = check_masks(list(texts), h, w)
        for i, e in enumerate(errors):
            if e is not None:
                raise ValueError(f"mask {i}: {e}")
    n = len(texts)
    flat = np.zeros(h * w, dtype=np.int32)  # Fortran order: flat[x * h + y]
    if n:
        runs, first, nvals, _, _ = _parse_counts([zlib.decompress(base64.b64decode(t)) for t in texts])
        owner = np.repeat(np.arange(n, dtype=np.int64), nvals)
        csum = np.cumsum(runs)
        run_end = csum - (csum[first] - runs[first])[owner]  # cumulative within each string
        fg = ((np.arange(runs.size) - first[owner]) % 2 == 1) & (runs > 0)  # background, foreground, ...
        starts, lengths, owner = (run_end - runs)[fg], runs[fg], owner[fg]
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], (starts + lengths)[order]
        if s.size < 2 or not (s[1:] < np.maximum.accumulate(e)[:-1]).any():
            # disjoint runs: +label at each start, -label at each end, one cumulative sum
            step = np.zeros(h * w + 1, dtype=np.int32)
            np.add.at(step, starts, (owner + 1).astype(np.int32))
            np.add.at(step, starts + lengths, -(owner + 1).astype(np.int32))
            np.cumsum(step[:-1], out=flat)
        else:  # rare: paint the last mask first so that the first listed wins
            logger.debug("masks overlap; overlapped pixels go to the first listed")
            bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=n))))
            for i in range(n - 1, -1, -1):  # one cell's runs at a time, O(its area)
                st, ln = starts[bounds[i] : bounds[i + 1]], lengths[bounds[i] : bounds[i + 1]]
                pix = np.repeat(st - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()), dtype=np.int64)
                flat[pix] = i + 1
    return flat.reshape(w, h).T, areas
