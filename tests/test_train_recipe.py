"""The recipe, rule by rule: the 384 crop, gamma, and the recipe config run end to end on CPU."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from hpa_kernel.train.config import load_train_config
from hpa_kernel.train.dataset import RGBYDataset, to_model_input
from hpa_kernel.train.losses import ComboLoss

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "hpa_seresnext50_512.json"


def _index(tmp_path, n=3, side=512):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 256, (side, side, 4), dtype=np.uint8)
        np.save(tmp_path / f"im{i}.npy", img)
        rows.append({"ID": f"im{i}", "Label": str(i), "path": str(tmp_path / f"im{i}.npy")})
    return pd.DataFrame(rows)


def test_every_training_sample_is_a_random_384_crop_of_the_512_image(tmp_path):
    cfg = load_train_config(RECIPE)
    frame = _index(tmp_path)
    ds = RGBYDataset(frame, cfg.image_size, crop=cfg.train_crop)
    full = np.load(frame["path"][0])
    offsets = set()
    for _ in range(20):
        x, y = ds[0]
        assert x.shape == (384, 384, 4) and x.dtype == torch.uint8 and y[0] == 1
        a = x.numpy()
        # find where the window sits: its first row occurs in the full image at (y0, x0)
        hits = [(r, c) for r in range(512 - 383) for c in [int(j) for j in np.flatnonzero(full[r, :129, 0] == a[0, 0, 0])]
                if np.array_equal(full[r, c : c + 384], a[0])]
        assert len(hits) == 1
        r, c = hits[0]
        assert np.array_equal(full[r : r + 384, c : c + 384], a)
        offsets.add(hits[0])
    assert len(offsets) > 15  # uniformly placed, not a fixed window
    val = RGBYDataset(frame, cfg.image_size)  # validation: the whole image
    assert val[0][0].shape == (512, 512, 4)


def test_gamma_is_half_in_the_recipe_and_weighs_the_l1_term():
    cfg = load_train_config(RECIPE)
    assert cfg.gamma == 0.5 and ComboLoss().gamma == 0.5
    torch.manual_seed(0)
    logits, f = torch.randn(2, 19), torch.randn(2, 19, 4, 4)
    f_re = f + 0.5
    y = (torch.rand(2, 19) > 0.5).float()
    out = ComboLoss(cfg.gamma)(logits, f, f_re, y)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    want = bce(logits, y) + bce(f_re.mean((2, 3)), y) + 0.5 * 0.5
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-6)


def test_normalisation_happens_on_the_device_side():
    from hpa_kernel.stages.model import RGBY_MEAN, RGBY_STD, normalize

    x = torch.randint(0, 256, (2, 8, 8, 4), dtype=torch.uint8)
    got = to_model_input(x, RGBY_MEAN, RGBY_STD)
    want = normalize(x.permute(0, 3, 1, 2).float() / 255.0, RGBY_MEAN, RGBY_STD)
    assert got.shape == (2, 4, 8, 8) and got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_recipe_config_two_steps_on_cpu_then_the_kernel_loads_it(tmp_path, caplog):
    """configs/hpa_seresnext50_512.json as shipped, with the backbone swapped for timm's
    test_resnet (from a local 'ImageNet' file) and the sizes scaled for a CPU test."""
    from hpa_kernel.stages.model import load_checkpoint
    from hpa_kernel.tools.synthetic import write_dataset
    from hpa_kernel.train.engine import Trainer
    from hpa_kernel.train.prepare import prepare_cache

    write_dataset(tmp_path / "data", 8, seed=1007, sizes=128, depth=8, split="train", progress=False)
    s = prepare_cache(tmp_path / "data" / "train.csv", [tmp_path / "data" / "train"], tmp_path / "cache",
                      size=256, workers=1, n_folds=4, progress=False)
    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    cfg = load_train_config(RECIPE, {
        "index_csv": str(s.index_path), "out": str(tmp_path / "run"), "backbone": "test_resnet",
        "pretrained_file": str(weights), "image_size": 256, "train_crop": 192, "batch_size": 4,
        "epochs": 2, "max_batches": 1, "workers": 1, "threads": 1, "device": "cpu",
    })
    assert cfg.pretrained and cfg.gamma == 0.5 and cfg.augment.groups.keys() >= {"noise", "warp", "blur", "colour"}
    with caplog.at_level(logging.INFO, logger="hpa_kernel.train"):
        t = Trainer(cfg)
        history = t.fit()
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "backbone: timm test_resnet" in log and f"ImageNet weights from {weights}" in log
    assert "global batch 4" in log and "augmentation groups: noise p0.5 [GaussNoise 0.5" in log
    assert "config defaults used" in log
    assert len(history) == 2 and all(np.isfinite(h.train_loss) for h in history)  # two steps, one per epoch
    assert history[1].best and not history[0].best  # best kept from epoch 2 on
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["backbone"] == "test_resnet" and meta["image_size"] == 256 and meta["crop_size"] == 384
    assert meta["train_crop"] == 192 and str(weights) in meta["trained_from"]
    from hpa_kernel.stages.model import classify_image

    probs, cams = classify_image(model, np.random.default_rng(0).random((512, 512, 4), dtype=np.float32))
    assert probs.shape == (19,) and np.isfinite(probs).all() and cams.shape[0] == 19
