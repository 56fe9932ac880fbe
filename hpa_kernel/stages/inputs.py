"""Input pipelines: how a classifier's pixels are made from a raw RGBY image.

A model must be fed the way it was trained, so a checkpoint names its pipeline (its meta's
``"input"``, like timm's ``pretrained_cfg``; :attr:`hpa_kernel.stages.model.PuzzleCAM.data_config`)
and the kernel makes that model's pixels with it. A pipeline turns a raw ``(H, W, 4)``
uint8/uint16 image (channels R, G, B, Y) into ``(size, size, 4)`` float32 pixels in [0, 1];
the per-channel mean/std normalisation that follows is the checkpoint's
(:func:`hpa_kernel.stages.model.normalize`).

``"hpa_kernel"`` (the default; our trainer's and the segmenters'): :func:`resize_rgby`,
``cv2.INTER_AREA`` in the native depth, then divided by 255 (uint8) or 65535 (uint16).

``"mpware"`` (the third-place team's checkpoints, ``hdf5_dump.py`` + ``HPADataset`` of
MPWARE-TEAM/HPA2021): :func:`mpware_pixels`, the four planes as uint16, divided by 65535 if
the stack's maximum is above 255 else by 255 (float32), ``skimage.transform.resize(...,
anti_aliasing=True)``, truncated to uint8 (``(255 * x).astype(np.uint8)``), then divided by
255 (their ``preprocess_input`` divides only when the uint8 image's maximum is above 1).

:class:`ImageInput` holds one image and makes each ``(pipeline, size)`` at most once, so a
run pays one resize per distinct pipeline per image, not one per model.

This module imports neither torch nor the rest of the package (``formats`` reads images
through :func:`resize_rgby`).
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

__all__ = [
    "DEFAULT_PIPELINE",
    "INPUT_PIPELINES",
    "ImageInput",
    "check_rgby",
    "get_pipeline",
    "mpware_pixels",
    "resize_rgby",
]


def check_rgby(rgby: np.ndarray) -> np.ndarray:
    """``rgby`` as an array, or ``ValueError`` unless it is ``(H, W, 4)`` uint8/uint16 with H, W > 0."""
    rgby = np.asarray(rgby)
    if rgby.ndim != 3 or rgby.shape[2] != 4 or rgby.shape[0] == 0 or rgby.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 4) image, got shape {rgby.shape}")
    if rgby.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16, got {rgby.dtype}")
    return rgby


def _size(size: int) -> int:
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return size


def resize_rgby(rgby: np.ndarray, size: int = 512) -> np.ndarray:
    """The ``"hpa_kernel"`` pipeline: ``(H, W, 4)`` uint8/uint16 -> ``(size, size, 4)`` float32 in [0, 1].

    ``cv2.INTER_AREA`` in the native dtype (a non-square image is stretched to square), then
    divided by 255 (uint8) or 65535 (uint16). An image already ``size x size`` is only
    converted.
    """
    rgby = check_rgby(rgby)
    scale = 255.0 if rgby.dtype == np.uint8 else 65535.0
    size = _size(size)
    if rgby.shape[:2] != (size, size):
        rgby = cv2.resize(rgby, (size, size), interpolation=cv2.INTER_AREA)
    out = rgby.astype(np.float32)
    out *= np.float32(1.0 / scale)
    return out


def mpware_pixels(rgby: np.ndarray, size: int = 512) -> np.ndarray:
    """The ``"mpware"`` pipeline (the third-place team's): ``(size, size, 4)`` float32 in [0, 1].

    Step by step as their code does it: the planes stacked as uint16; divided by 65535 if
    the stack's maximum is above 255, else by 255, as float32;
    ``skimage.transform.resize(x, (size, size), anti_aliasing=True)`` (also at the same
    size, as they do); ``(255 * x).astype(np.uint8)`` (truncation); then ``/ 255`` when the
    uint8 image's maximum is above 1 (their ``preprocess_input`` rule; a near-black image
    keeps its 0/1 values).

    A raw image read by :func:`hpa_kernel.formats.images.read_rgby` is what their PIL
    reader gives, except for an image mixing 8- and 16-bit planes (ours scales the 8-bit
    planes by 257, theirs keeps their values).
    """
    import skimage.transform

    stack = check_rgby(rgby).astype(np.uint16)
    scale = 65535.0 if int(stack.max()) > 255 else 255.0
    x = (stack / scale).astype(np.float32)
    x = skimage.transform.resize(x, (_size(size), _size(size)), anti_aliasing=True)
    u8 = (255 * x).astype(np.uint8)
    out = u8.astype(np.float32)
    if int(u8.max()) > 1:
        out /= np.float32(255.0)
    return out


#: the pipelines a checkpoint may name (meta ``"input"``): name -> ``pixels(rgby, size) ->
#: (size, size, 4) float32``; the first is the default
INPUT_PIPELINES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "hpa_kernel": resize_rgby,
    "mpware": mpware_pixels,
}
DEFAULT_PIPELINE = "hpa_kernel"


def get_pipeline(name: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """The registered pipeline ``name`` (its pixel function); ``ValueError`` naming the known ones otherwise."""
    try:
        return INPUT_PIPELINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown input pipeline {name!r}; known: {', '.join(INPUT_PIPELINES)}") from None


class ImageInput:
    """One image and the pixels each input pipeline makes of it, each made once.

    Args:
        rgby: the raw ``(H, W, 4)`` uint8/uint16 image; ``None`` when only the kernel's
            working pixels are at hand (then only the ``"hpa_kernel"`` pipeline can be fed).
        size: the working size ``S`` (the manifest's ``image_size``): segmentation, labels
            and Step 2 crops are at ``S x S``.
        image: the ``"hpa_kernel"`` pixels at ``S`` if already made (e.g. by a reader
            thread); else made from ``rgby`` on first use.

    The ``"hpa_kernel"`` pixels at another size are the working pixels resized with
    ``cv2.INTER_AREA`` (what the kernel always did for a checkpoint of another
    ``image_size``); every other pipeline starts from the raw image.
    """

    def __init__(self, rgby: np.ndarray | None, size: int = 512, image: np.ndarray | None = None) -> None:
        self.rgby = check_rgby(rgby) if rgby is not None else None
        self.size = _size(size if image is None else image.shape[0])
        if image is None and self.rgby is None:
            raise ValueError("ImageInput needs the raw image or the working pixels")
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        if image is not None:
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[2] != 4:
                raise ValueError(f"working pixels must be (S, S, 4), got {image.shape}")
            self._cache[(DEFAULT_PIPELINE, self.size)] = image

    @classmethod
    def of(cls, image: "ImageInput | np.ndarray") -> "ImageInput":
        """``image`` itself, or a float ``(S, S, 4)`` array as the working pixels (no raw image)."""
        return image if isinstance(image, ImageInput) else cls(None, image=image)

    @property
    def image(self) -> np.ndarray:
        """The working pixels: the ``"hpa_kernel"`` pipeline at ``S`` (what segmenters see)."""
        return self.pixels(DEFAULT_PIPELINE, self.size)

    def pixels(self, pipeline: str, size: int) -> np.ndarray:
        """``(size, size, 4)`` float32 pixels of ``pipeline`` (made once, then cached)."""
        key = (pipeline, _size(size))
        if key not in self._cache:
            self._cache[key] = self._make(pipeline, key[1])
        return self._cache[key]

    def _make(self, pipeline: str, size: int) -> np.ndarray:
        pixels = get_pipeline(pipeline)
        if pipeline == DEFAULT_PIPELINE and size != self.size:
            return cv2.resize(self.image, (size, size), interpolation=cv2.INTER_AREA)
        if self.rgby is None:
            raise ValueError(f"the {pipeline!r} input pipeline needs the raw image, only working pixels were given")
        return pixels(self.rgby, size)
