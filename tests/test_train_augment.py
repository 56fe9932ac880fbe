import numpy as np
import pytest


from hpa_kernel.train.augment import TRANSFORMS, RGBYAugment, apply_transform, build_transforms
from hpa_kernel.train.config import AugmentConfig

WRITE_UP = [
    "GaussNoise", "CoarseDropout", "HorizontalFlip", "RandomRotate90", "GridDistortion", "ShiftScaleRotate",
    "ElasticTransform", "OpticalDistortion", "Shear", "GaussianBlur", "MotionBlur", "MedianBlur",
    "RandomGamma", "RandomBrightnessContrast",
]


def test_every_write_up_transform_is_there():
    assert sorted(TRANSFORMS) == sorted(WRITE_UP)


def _image(dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    hi = np.iinfo(dtype).max
    img = rng.integers(0, hi // 4, (64, 64, 4)).astype(dtype)
    img[10:30, 20:44] = hi // 2  # some structure for blurs and warps to act on
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("name", WRITE_UP)
def test_transform_keeps_shape_and_dtype(name, dtype):
    img = _image(dtype)
    t = TRANSFORMS[name](1.0)
    t.set_random_seed(0) if hasattr(t, "set_random_seed") else None
    out = apply_transform(t, img)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert not np.array_equal(out, img) or name in ("CoarseDropout",), name  # it did something
    if dtype == np.uint16:  # stayed on the 16-bit scale (not squashed to 0..255)
        assert out.max() > 255


@pytest.mark.parametrize("level", ["none", "light", "full"])
def test_pipeline_levels(level):
    aug = RGBYAugment(AugmentConfig(level=level, p=1.0), seed=0)
    for dtype in (np.uint8, np.uint16):
        img = _image(dtype)
        out = aug(img)
        assert out.shape == img.shape and out.dtype == img.dtype
    if level == "none":
        assert np.array_equal(aug(_image(np.uint8)), _image(np.uint8))


def test_pipeline_is_seeded():
    img = _image(np.uint8)
    a = RGBYAugment(AugmentConfig(p=1.0), seed=7)(img)
    b = RGBYAugment(AugmentConfig(p=1.0), seed=7)(img)
    assert np.array_equal(a, b)


def test_bad_dtype_and_level():
    with pytest.raises(TypeError):
        apply_transform(build_transforms(), np.zeros((8, 8, 4), np.int32))
    with pytest.raises(ValueError):
        build_transforms(AugmentConfig(level="heavy"))
