"""Augmentation groups: structure, probabilities and parameters come from the config."""

import albumentations as A
import numpy as np
import pytest

from hpa_kernel.train.augment import RGBYAugment, apply_transform, build_transforms, make_transform
from hpa_kernel.train.config import RECIPE_AUGMENT, AugmentConfig, TrainConfigError


def _image(dtype=np.uint8, side=64) -> np.ndarray:
    rng = np.random.default_rng(0)
    hi = np.iinfo(dtype).max
    img = rng.integers(0, hi // 4, (side, side, 4)).astype(dtype)
    img[10:30, 20:44] = hi // 2  # some structure for blurs and warps to act on
    return img


def _groups(compose):
    return [(g.p, [(type(t).__name__, t.p) for t in g.transforms]) for g in compose.transforms]


def test_recipe_groups_probabilities_and_weights():
    groups = _groups(build_transforms(AugmentConfig()))
    assert [p for p, _ in groups] == [0.5, 0.5, 1.0, 0.5, 0.5, 0.25]
    assert groups[0][1] == [("GaussNoise", 0.5), ("CoarseDropout", 0.5), ("GaussNoise", 0.5)]
    assert groups[1][1] == [("HorizontalFlip", 1.0)] and groups[2][1] == [("RandomRotate90", 1.0)]
    assert groups[3][1] == [("GridDistortion", 0.15), ("Affine", 0.75), ("ElasticTransform", 0.15),
                            ("OpticalDistortion", 0.10), ("Affine", 0.5)]
    assert groups[4][1] == [("GaussianBlur", 0.5), ("MotionBlur", 0.5), ("MedianBlur", 0.5)]
    assert groups[5][1] == [("RandomGamma", 0.5), ("RandomBrightnessContrast", 0.5)]


def test_recipe_parameters():
    c = build_transforms(AugmentConfig())
    noise, _, _, warp, blur, colour = c.transforms
    assert noise.transforms[0].std_range == pytest.approx((np.sqrt(5) / 255, np.sqrt(30) / 255), abs=1e-4)
    assert noise.transforms[2].std_range == (0.02, 0.05)
    assert noise.transforms[1].num_holes_range == (1, 8) and noise.transforms[1].hole_height_range == (1, 32)
    grid, ssr, elastic, optical, shear = warp.transforms
    assert grid.num_steps == 5 and grid.distort_limit == (-0.3, 0.3)
    assert ssr.rotate == (-30, 30) and ssr.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)}
    assert ssr.translate_percent == {"x": (-0.05, 0.05), "y": (-0.05, 0.05)}
    assert (elastic.alpha, elastic.sigma) == (1.0, 50.0) and optical.distort_limit == (-0.05, 0.05)
    assert shear.shear == {"x": (-5, 5), "y": (-5, 5)}
    assert [t.blur_limit for t in blur.transforms] == [(3, 5), (3, 5), (3, 7)]
    assert colour.transforms[0].gamma_limit == (80, 120)
    assert colour.transforms[1].brightness_limit == (-0.2, 0.2) and colour.transforms[1].contrast_limit == (-0.2, 0.2)


def test_groups_and_probabilities_are_read_from_the_config():
    cfg = AugmentConfig.from_raw({
        "noise": {"p": 0.3},  # p only: the recipe's transforms stay
        "blur": None,  # removed
        "warp": {"transforms": {"Affine": {"weight": 2.0, "rotate": [-10, 10]}}},  # transforms replaced
        "extra": {"p": 0.2, "transforms": {"VerticalFlip": {"weight": 1.0}}},  # added at the end
    })
    groups = _groups(build_transforms(cfg))
    assert [p for p, _ in groups] == [0.3, 0.5, 1.0, 0.5, 0.25, 0.2]
    assert len(groups[0][1]) == 3 and groups[3][1] == [("Affine", 1.0)] and groups[5][1] == [("VerticalFlip", 1.0)]
    assert build_transforms(cfg).transforms[3].transforms[0].rotate == (-10, 10)
    assert build_transforms(AugmentConfig.from_raw("none")).transforms == []


def test_group_probability_is_obeyed():
    img = _image()
    always = RGBYAugment(AugmentConfig.from_raw("none"), seed=0)
    assert np.array_equal(always(img), img)
    flip = {"flip": {"p": 1.0, "transforms": {"HorizontalFlip": {"weight": 1.0}}}}
    only_flip = AugmentConfig.from_raw({**{k: None for k in RECIPE_AUGMENT}, **flip})
    assert np.array_equal(RGBYAugment(only_flip, seed=0)(img), img[:, ::-1])
    never = AugmentConfig.from_raw({k: {"p": 0.0} for k in RECIPE_AUGMENT})
    assert np.array_equal(RGBYAugment(never, seed=0)(img), img)
    half = AugmentConfig.from_raw({**{k: None for k in RECIPE_AUGMENT}, "flip": {"p": 0.3}})
    aug = RGBYAugment(half, seed=1)
    share = np.mean([not np.array_equal(aug(img), img) for _ in range(600)])
    assert share == pytest.approx(0.3, abs=0.06)


def test_one_transform_per_group_with_the_relative_weights():
    img = _image()
    raw = {k: None for k in RECIPE_AUGMENT}
    raw["pick"] = {"p": 1.0, "transforms": {"HorizontalFlip": {"weight": 3.0}, "VerticalFlip": {"weight": 1.0}}}
    aug = RGBYAugment(AugmentConfig.from_raw(raw), seed=2)
    outs = [aug(img) for _ in range(800)]
    h = np.mean([np.array_equal(o, img[:, ::-1]) for o in outs])
    v = np.mean([np.array_equal(o, img[::-1]) for o in outs])
    assert h + v == 1.0  # exactly one of them every time (never both, never none)
    assert h == pytest.approx(0.75, abs=0.05)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_every_recipe_transform_keeps_shape_and_dtype(dtype):
    img = _image(dtype)
    for name, group in RECIPE_AUGMENT.items():
        for label, spec in group["transforms"].items():
            t = make_transform(label, {**spec, "weight": 1.0})
            t.set_random_seed(0)
            out = apply_transform(t, img)
            assert out.shape == img.shape and out.dtype == img.dtype, label
            if dtype == np.uint16:  # stayed on the 16-bit scale
                assert out.max() > 255, label


def test_bad_transform_entries_name_the_field():
    with pytest.raises(TrainConfigError, match=r"augment\.x\.transforms\.Foo: 'Foo' is not an albumentations"):
        build_transforms(AugmentConfig.from_raw({"x": {"p": 1, "transforms": {"Foo": {"weight": 1}}}}))
    with pytest.raises(TrainConfigError, match=r"augment\.blur\.transforms\.GaussianBlur: GaussianBlur has no argument"):
        build_transforms(AugmentConfig.from_raw({"blur": {"transforms": {"GaussianBlur": {"weight": 1, "radius": 3}}}}))
    with pytest.raises(TrainConfigError, match=r"augment\.noise\.transforms\.GaussNoise: GaussNoise: std_range"):
        build_transforms(AugmentConfig.from_raw({"noise": {"transforms": {"GaussNoise": {"weight": 1,
                                                                                        "std_range": [5, 30]}}}}))
    with pytest.raises(TrainConfigError, match=r"augment\.noise\.p"):
        AugmentConfig.from_raw({"noise": {"p": 2}}).validate()
    with pytest.raises(TrainConfigError, match=r"augment\.new: a new group needs"):
        AugmentConfig.from_raw({"new": {"p": 0.5}})


def test_pipeline_is_seeded():
    img = _image()
    a = RGBYAugment(AugmentConfig(), seed=7)
    b = RGBYAugment(AugmentConfig(), seed=7)
    assert all(np.array_equal(a(img), b(img)) for _ in range(5))


def test_bad_dtype():
    with pytest.raises(TypeError):
        apply_transform(build_transforms(), np.zeros((8, 8, 4), np.int32))
    assert isinstance(build_transforms(), A.Compose)
