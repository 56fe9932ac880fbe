import numpy as np
import pytest

from hpa_kernel.train.sampler import DistributedWeightedSampler, class_weights, image_weights, make_sampler


def _labels() -> np.ndarray:
    """100 images: class 0 in 80, class 8 in 10, class 11 in 2, class 15 in 1."""
    y = np.zeros((100, 19), np.uint8)
    y[:80, 0] = 1
    y[80:90, 8] = 1
    y[90:92, 11] = 1
    y[92:93, 15] = 1
    y[93:, 16] = 1
    return y


def test_class_weights_inverse_frequency_clipped_at_class_8():
    w = class_weights(_labels(), clip_class=8)
    assert w[0] == pytest.approx(100 / 80)
    assert w[8] == pytest.approx(10.0)
    assert w[11] == pytest.approx(10.0) and w[15] == pytest.approx(10.0)  # clipped (would be 50, 100)
    assert w[1] == 0  # absent
    unclipped = class_weights(_labels(), clip_class=None)
    assert unclipped[15] == pytest.approx(100.0)


def test_image_weights_favour_rare_classes():
    y = _labels()
    w = image_weights(y)
    assert w.mean() == pytest.approx(1.0)
    assert w[85] > w[0]  # intermediate filaments over nucleoplasm
    assert w[90] == pytest.approx(w[85])  # mitotic spindle clipped at class 8
    # an image with nucleoplasm + a rare class gets the rare class's weight under "max"
    y2 = y.copy()
    y2[0, 8] = 1
    assert image_weights(y2, "max")[0] > image_weights(y2, "mean")[0]


def test_weighted_sampler_draws_rare_classes_more_often():
    y = _labels()
    s = make_sampler(image_weights(y), num_samples=20000, seed=0)
    idx = np.fromiter(iter(s), int)
    share_nucleoplasm = (idx < 80).mean()
    assert share_nucleoplasm < 0.5  # 80 % of the images, far less of the draws
    assert (idx >= 93).mean() > 0.1


def test_distributed_sampler_ranks_split_the_shared_draw():
    w = image_weights(_labels())
    full = DistributedWeightedSampler(w, 64, rank=0, world_size=1, seed=5)
    full.set_epoch(2)
    r0 = DistributedWeightedSampler(w, 64, rank=0, world_size=2, seed=5)
    r1 = DistributedWeightedSampler(w, 64, rank=1, world_size=2, seed=5)
    for s in (r0, r1):
        s.set_epoch(2)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == len(r0) == 32
    merged = [None] * 64
    merged[0::2], merged[1::2] = a, b
    assert merged == list(full)
    r0.set_epoch(3)
    assert list(r0) != a  # a new draw each epoch
    r0.set_epoch(2)
    assert list(r0) == a  # and reproducible


def test_distributed_sampler_pads_uneven_totals():
    s = DistributedWeightedSampler(np.ones(10), 7, rank=2, world_size=3)
    assert len(s) == 3 and len(list(s)) == 3
    with pytest.raises(ValueError):
        DistributedWeightedSampler(np.ones(3), rank=3, world_size=3)
