"""Masks <-> the competition's mask strings.

A mask string is: COCO RLE of the Fortran-ordered uint8 mask (``pycocotools.mask.encode``,
its ``counts`` bytes) -> ``zlib.compress(level=9)`` -> base64 -> ASCII.
"""

from __future__ import annotations

import base64
import zlib

import numpy as np
from pycocotools import mask as mask_util


def _pack(counts: bytes) -> str:
    return base64.b64encode(zlib.compress(counts, 9)).decode("ascii")


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))


def encode_mask(mask: np.ndarray) -> str:
    """Encode one binary mask (H, W) as a competition mask string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return _pack(rle["counts"])


def decode_mask(text: str, height: int, width: int) -> np.ndarray:
    """Decode a competition mask string into a boolean (height, width) mask.

    Raises ``ValueError`` if the string is not base64/zlib or does not describe a
    mask of that size.
    """
    try:
        counts = _unpack(text)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"mask string is not base64(zlib(RLE)): {e}") from None
    rle = {"size": [int(height), int(width)], "counts": counts}
    try:
        area = int(mask_util.area(rle))
        m = mask_util.decode(rle)
    except Exception as e:  # pycocotools raises bare Exceptions/ValueErrors
        raise ValueError(f"RLE does not decode at {height}x{width}: {e}") from None
    if m.shape != (height, width) or area != int(m.sum()):
        raise ValueError(f"RLE does not describe a {height}x{width} mask")
    return m.astype(bool)
