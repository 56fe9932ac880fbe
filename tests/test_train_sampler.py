"""The recipe's sampler rule on a label table worked out by hand."""

from fractions import Fraction as Fr

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.train.sampler import (
    DistributedWeightedSampler,
    class_weights,
    clip_value,
    draw_shares,
    image_weights,
    main,
)

# 11 images; class counts: 0 -> 6, 16 -> 4, 8 -> 3, 11 -> 2, 15 -> 1
LABELS = [[0], [0], [0], [0, 16], [0, 8], [0, 15], [16], [16], [16, 11], [8], [8, 11]]
# class weights 1/6, 1/4, 1/3, 1/2, 1: the third largest is 1/3 (class 8)
# image weight = mean of its labels' class weights, then min(., 1/3):
HAND = [Fr(1, 6), Fr(1, 6), Fr(1, 6),
        (Fr(1, 6) + Fr(1, 4)) / 2,      # 5/24
        (Fr(1, 6) + Fr(1, 3)) / 2,      # 1/4
        Fr(1, 3),                       # (1/6 + 1) / 2 = 7/12, clipped
        Fr(1, 4), Fr(1, 4),
        Fr(1, 3),                       # (1/4 + 1/2) / 2 = 3/8, clipped
        Fr(1, 3),
        Fr(1, 3)]                       # (1/3 + 1/2) / 2 = 5/12, clipped


def _y() -> np.ndarray:
    y = np.zeros((len(LABELS), 19), np.uint8)
    for i, ls in enumerate(LABELS):
        y[i, ls] = 1
    return y


def test_class_weights_are_inverse_counts():
    w = class_weights(_y())
    assert w[[0, 16, 8, 11, 15]] == pytest.approx([1 / 6, 1 / 4, 1 / 3, 1 / 2, 1.0])
    assert w[1] == 0  # absent
    assert clip_value(w, 3) == pytest.approx(1 / 3)


def test_image_weights_follow_the_hand_worked_rule():
    want = np.array([float(v) for v in HAND])
    got = image_weights(_y())
    assert got.mean() == pytest.approx(1.0)
    assert got / got.sum() == pytest.approx(want / want.sum(), rel=1e-12)


def test_expected_draw_shares():
    w = np.array([float(v) for v in HAND])
    total = sum(HAND)
    shares = draw_shares(_y(), image_weights(_y()))
    assert shares[15] == pytest.approx(float(HAND[5] / total))
    assert shares[11] == pytest.approx(float((HAND[8] + HAND[10]) / total))
    assert shares[0] == pytest.approx(float(sum(HAND[:6]) / total))
    assert shares[1] == 0 and w.size == 11


def test_cli_writes_id_weight_and_prints_shares(tmp_path, capsys):
    df = pd.DataFrame({"ID": [f"im{i}" for i in range(len(LABELS))], "Label": ["|".join(map(str, ls)) for ls in LABELS]})
    df.to_csv(tmp_path / "train.csv", index=False)
    assert main(["--csv", str(tmp_path / "train.csv"), "--out", str(tmp_path / "w.csv")]) == 0
    out = pd.read_csv(tmp_path / "w.csv")
    assert list(out.columns) == ["ID", "weight"] and out["ID"].tolist() == df["ID"].tolist()
    want = np.array([float(v) for v in HAND])
    assert out["weight"].to_numpy() / out["weight"].sum() == pytest.approx(want / want.sum(), rel=1e-5)
    text = capsys.readouterr().out
    row15 = next(line for line in text.splitlines() if line.split()[:1] == ["15"])
    assert f"{100 * float(HAND[5] / sum(HAND)):.2f}" in row15
    assert main(["--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "w.csv")]) == 2


def test_weighted_draws_match_the_expected_shares():
    y = _y()
    s = DistributedWeightedSampler(image_weights(y), 40000, seed=0)
    idx = np.fromiter(iter(s), int)
    drawn = y[idx].mean(0)
    assert drawn[[0, 8, 11, 15, 16]] == pytest.approx(draw_shares(y, image_weights(y))[[0, 8, 11, 15, 16]], abs=0.01)


def test_distributed_sampler_ranks_split_the_shared_draw():
    w = image_weights(_y())
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
