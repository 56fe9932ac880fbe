"""Training augmentations on 4-channel RGBY images (albumentations 2.x), in groups.

The pipeline is built from :class:`hpa_kernel.train.config.AugmentConfig`: one
``A.OneOf`` per group, in the config's order, with the group's ``p``; its members are the
group's transforms with ``p = weight`` (``OneOf`` normalises the members' ``p`` into the
draw probabilities and applies the drawn one always). So a group fires with probability
``p`` and then applies exactly one transform, drawn with the relative weights.

The recipe (:data:`hpa_kernel.train.config.RECIPE_AUGMENT`, the reference's groups)::

    noise    p 0.5   GaussNoise 0.5, CoarseDropout 0.5, AdditiveGaussianNoise 0.5
    flip     p 0.5   HorizontalFlip
    rotate90 p 1.0   RandomRotate90
    warp     p 0.5   GridDistortion 0.15, ShiftScaleRotate 0.75, ElasticTransform 0.15,
                     OpticalDistortion 0.10, Shear 0.5
    blur     p 0.5   GaussianBlur 0.5, MotionBlur 0.5, MedianBlur 0.5
    colour   p 0.25  RandomGamma 0.5, RandomBrightnessContrast 0.5

albumentations 1.x (what the reference ran) -> 2.x (what runs here):

==========================================================  =================================================
1.x                                                         2.x (config entry)
==========================================================  =================================================
``GaussNoise(var_limit=(5, 30))`` (variance, grey levels)   ``GaussNoise(std_range=(0.0088, 0.0215))``: std as a
                                                            fraction of 255, sqrt(5)/255..sqrt(30)/255 (2.x draws
                                                            the std uniformly, 1.x the variance)
``CoarseDropout(max_holes=8, max_height=32, max_width=32)`` ``CoarseDropout(num_holes_range=(1, 8),
                                                            hole_height_range=(1, 32), hole_width_range=(1, 32))``
                                                            (1.x's min_* defaulted to the max_*: exactly 8 holes
                                                            of 32 px; set the ranges to (8, 8)/(32, 32) for that)
``IAAAdditiveGaussianNoise(scale=(0.02*255, 0.05*255))``    ``GaussNoise(std_range=(0.02, 0.05))`` (imgaug is gone)
``GridDistortion(num_steps=5, distort_limit=0.3)``          same names, ``border_mode=4`` (REFLECT_101, 1.x's
                                                            default; 2.x's is CONSTANT) on every warp
``ShiftScaleRotate(0.05, 0.1, 30)``                         ``Affine(translate_percent=(-0.05, 0.05),
                                                            scale=(0.9, 1.1), rotate=(-30, 30))`` (deprecated in
                                                            2.x as "a special case of Affine")
``ElasticTransform(alpha=1, sigma=50, alpha_affine=50)``    ``ElasticTransform(alpha=1, sigma=50)``: 2.x removed
                                                            ``alpha_affine`` (its random affine part is not
                                                            reproduced; ShiftScaleRotate covers affine moves)
``OpticalDistortion(distort_limit=0.05, shift_limit=0.05)`` ``OpticalDistortion(distort_limit=0.05)``: 2.x removed
                                                            ``shift_limit`` (the centre no longer moves)
``IAAAffine(shear=5)``                                      ``Affine(shear=(-5, 5))``
``GaussianBlur/MotionBlur(blur_limit=(3, 5))``,             same names and arguments
``MedianBlur(blur_limit=(3, 7))``, ``RandomGamma((80,
120))``, ``RandomBrightnessContrast(0.2, 0.2)``,
``HorizontalFlip``, ``RandomRotate90``
==========================================================  =================================================

dtypes: albumentations 2.x supports ``uint8`` and ``float32``; the cache is ``uint8`` and
goes through as is. ``uint16`` images are run as ``float32`` in [0, 1] and converted back
(GaussNoise raises on uint16, MedianBlur and RandomGamma change its scale).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402

from hpa_kernel.train.config import AugmentConfig, TrainConfigError  # noqa: E402

__all__ = ["make_transform", "build_transforms", "apply_transform", "RGBYAugment"]


def _tuples(value: Any) -> Any:
    """JSON lists -> tuples (albumentations' ranges)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _first_error(e: Exception) -> str:
    """One line of an albumentations/pydantic error: ``field: message``."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) >= 3 and "validation error" in lines[0]:
        return f"{lines[1]}: {lines[2].split(' [type=')[0]}"
    return lines[0] if lines else type(e).__name__


def make_transform(label: str, spec: dict[str, Any], where: str = "augment", scale: float = 1.0) -> A.BasicTransform:
    """One config entry ``{"weight": w, "transform": CLASS, **kwargs}`` -> the albumentations
    transform with ``p = w / scale`` (its weight inside a ``OneOf``). A wrong class name,
    argument name or value raises :class:`TrainConfigError` naming ``where.LABEL``."""
    where = f"{where}.{label}"
    spec = dict(spec)
    weight = spec.pop("weight") / scale
    name = spec.pop("transform", label)
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise TrainConfigError(f"{where}: {name!r} is not an albumentations transform (set 'transform' to one)")
    params = inspect.signature(cls).parameters
    bad = sorted(k for k in spec if k not in params or k == "p")
    if bad:
        raise TrainConfigError(f"{where}: {name} has no argument(s) {', '.join(bad)}")
    try:
        return cls(**{k: _tuples(v) for k, v in spec.items()}, p=float(weight))
    except Exception as e:  # noqa: BLE001 - pydantic / value errors become one line
        raise TrainConfigError(f"{where}: {name}: {_first_error(e)}") from None


def build_transforms(cfg: AugmentConfig | None = None, seed: int | None = None) -> A.Compose:
    """The training pipeline: one ``A.OneOf(members, p=group.p)`` per group, in order.

    Members get ``p = weight`` (divided by the group's largest weight when that is above 1,
    albumentations' ``p`` being at most 1; ``OneOf`` only uses their ratios).
    """
    cfg = cfg or AugmentConfig()
    groups = []
    for name, g in cfg.groups.items():
        scale = max(1.0, max(float(t["weight"]) for t in g.transforms.values()))
        members = [make_transform(label, spec, f"augment.{name}.transforms", scale)
                   for label, spec in g.transforms.items()]
        groups.append(A.OneOf(members, p=float(g.p)))
    return A.Compose(groups, seed=seed)


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
