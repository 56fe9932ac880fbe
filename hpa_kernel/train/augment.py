"""Training augmentations on 4-channel RGBY images (albumentations 2.x).

albumentations 2.x supports ``uint8`` and ``float32`` images; several of its transforms
break on ``uint16`` (GaussNoise raises, MedianBlur and RandomGamma change dtype and
scale). :class:`RGBYAugment` therefore runs ``uint16`` images through the pipeline as
``float32`` in [0, 1] and converts back, so every transform keeps shape and dtype for
``uint8`` and ``uint16``. MedianBlur on float input is computed by albumentations on an
8-bit copy (OpenCV's float median supports only small kernels), so on ``uint16`` images
it quantises to 256 levels; acceptable for an augmentation.

``ShiftScaleRotate`` is deprecated in albumentations 2.x ("a special case of Affine");
the ``ShiftScaleRotate`` entry below is the equivalent :class:`A.Affine` (translate +
scale + rotate), and ``Shear`` is a separate Affine shear.
"""

from __future__ import annotations

import os
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from hpa_kernel.train.config import AugmentConfig  # noqa: E402

__all__ = ["TRANSFORMS", "RGBYAugment", "build_transforms", "apply_transform"]

_BORDER = cv2.BORDER_REFLECT_101

#: name -> factory(p) for each augmentation of the write-up, in its order.
TRANSFORMS: dict[str, Callable[[float], A.BasicTransform]] = {
    "GaussNoise": lambda p: A.GaussNoise(std_range=(0.02, 0.08), p=p),
    "CoarseDropout": lambda p: A.CoarseDropout(
        num_holes_range=(1, 6), hole_height_range=(0.04, 0.1), hole_width_range=(0.04, 0.1), fill=0, p=p
    ),
    "HorizontalFlip": lambda p: A.HorizontalFlip(p=p),
    "RandomRotate90": lambda p: A.RandomRotate90(p=p),
    "GridDistortion": lambda p: A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=_BORDER, p=p),
    "ShiftScaleRotate": lambda p: A.Affine(
        translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), border_mode=_BORDER, p=p
    ),
    "ElasticTransform": lambda p: A.ElasticTransform(alpha=30, sigma=6, border_mode=_BORDER, p=p),
    "OpticalDistortion": lambda p: A.OpticalDistortion(distort_limit=0.2, border_mode=_BORDER, p=p),
    "Shear": lambda p: A.Affine(shear=(-12, 12), border_mode=_BORDER, p=p),
    "GaussianBlur": lambda p: A.GaussianBlur(blur_limit=(3, 5), p=p),
    "MotionBlur": lambda p: A.MotionBlur(blur_limit=(3, 7), p=p),
    "MedianBlur": lambda p: A.MedianBlur(blur_limit=(3, 5), p=p),
    "RandomGamma": lambda p: A.RandomGamma(gamma_limit=(80, 120), p=p),
    "RandomBrightnessContrast": lambda p: A.RandomBrightnessContrast(
        brightness_limit=0.15, contrast_limit=0.15, p=p
    ),
}

_GEOMETRY = ("HorizontalFlip", "RandomRotate90")
_ONE_OF_WARP = ("GridDistortion", "ShiftScaleRotate", "ElasticTransform", "OpticalDistortion", "Shear")
_ONE_OF_BLUR = ("GaussianBlur", "MotionBlur", "MedianBlur")
_ONE_OF_INTENSITY = ("RandomGamma", "RandomBrightnessContrast")


def build_transforms(cfg: AugmentConfig | None = None, seed: int | None = None) -> A.Compose:
    """The training pipeline for ``cfg.level`` (``none`` / ``light`` / ``full``).

    ``full``: flips and 90° rotations (``flip_p``), then one geometric warp, one blur,
    one intensity change, noise and coarse dropout, each group with probability ``p``.
    """
    cfg = cfg or AugmentConfig()
    if cfg.level == "none":
        return A.Compose([], seed=seed)
    ops: list[A.BasicTransform] = [TRANSFORMS[n](cfg.flip_p) for n in _GEOMETRY]
    if cfg.level == "full":
        ops += [
            A.OneOf([TRANSFORMS[n](1.0) for n in _ONE_OF_WARP], p=cfg.p),
            A.OneOf([TRANSFORMS[n](1.0) for n in _ONE_OF_BLUR], p=cfg.p),
            A.OneOf([TRANSFORMS[n](1.0) for n in _ONE_OF_INTENSITY], p=cfg.p),
            TRANSFORMS["GaussNoise"](cfg.p),
            TRANSFORMS["CoarseDropout"](cfg.p),
        ]
    elif cfg.level != "light":
        raise ValueError(f"augment level must be none/light/full, not {cfg.level!r}")
    return A.Compose(ops, seed=seed)


def apply_transform(transform: A.BasicTransform | A.Compose, image: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to an ``(H, W, C)`` uint8, uint16 or float32 image, keeping its dtype.

    ``uint16`` goes through float32 in [0, 1] (see the module docstring).
    """
    if image.dtype == np.uint16:
        f = image.astype(np.float32) * (1.0 / 65535.0)
        out = transform(image=f)["image"]
        return np.clip(np.rint(np.asarray(out, dtype=np.float32) * 65535.0), 0, 65535).astype(np.uint16)
    if image.dtype not in (np.uint8, np.float32):
        raise TypeError(f"augmentations take uint8, uint16 or float32 images, not {image.dtype}")
    out = np.asarray(transform(image=image)["image"])
    if out.dtype != image.dtype:  # defensive: keep the caller's dtype
        out = np.clip(out, 0, 255).astype(np.uint8) if image.dtype == np.uint8 else out.astype(image.dtype)
    return out


class RGBYAugment:
    """Callable ``image -> image`` wrapping :func:`build_transforms` (picklable for workers).

    ``seed`` makes the draws reproducible; DataLoader workers call :meth:`reseed`.
    """

    def __init__(self, cfg: AugmentConfig | None = None, seed: int | None = None) -> None:
        self.cfg = cfg or AugmentConfig()
        self.transform = build_transforms(self.cfg, seed)

    def reseed(self, seed: int) -> None:
        self.transform.set_random_seed(int(seed) % 2**32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return apply_transform(self.transform, image)
