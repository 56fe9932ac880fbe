"""Step 2 crop size: the manifest's ``crop_size`` when it sets one, else the checkpoint's
(hpa_kernel.stages.predictor.crop_size_of), logged per model at start-up."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from hpa_kernel.formats.images import resize_rgby
from hpa_kernel.config import DEFAULT_MANIFEST, ConfigError, load_config
from hpa_kernel.stages.model import PuzzleCAM
from hpa_kernel.stages.predictor import DEFAULT_CROP_SIZE, Predictor, ScoreDetail, crop_size_of
from hpa_kernel.stages.step2 import crop_cells, predict_crops
from hpa_kernel.tools.synthetic import make_image

from conftest import write_manifest


def _manifest(tmp_path, checkpoint, **extra):
    path = write_manifest(tmp_path, checkpoint, **extra)
    raw = json.loads(path.read_text())
    if "crop_size" not in extra:
        raw.pop("crop_size")  # conftest's manifest sets one
    path.write_text(json.dumps(raw))
    return load_config(path)


def test_checkpoint_crop_size_when_the_manifest_sets_none(tmp_path, tiny_checkpoint, caplog):
    cfg = _manifest(tmp_path, tiny_checkpoint)
    assert cfg.crop_size is None
    with caplog.at_level(logging.INFO, logger="hpa_kernel.stages.predictor"):
        p = Predictor.from_config(cfg)
    assert p.members[0].crop_size == 32  # the tiny checkpoint's
    assert "Step 2 crops 32 px (checkpoint's crop_size)" in caplog.text


def test_manifest_crop_size_wins_and_is_used(tmp_path, tiny_checkpoint, caplog):
    cfg = _manifest(tmp_path, tiny_checkpoint, crop_size=48)
    with caplog.at_level(logging.INFO, logger="hpa_kernel.stages.predictor"):
        p = Predictor.from_config(cfg)
    assert p.members[0].crop_size == 48
    assert "Step 2 crops 48 px (manifest's crop_size)" in caplog.text
    # the Step 2 scores are those of 48 px crops
    image = resize_rgby(make_image(np.random.default_rng(3), 512, 512).rgby, 512)
    detail = ScoreDetail()
    labels, ids, _ = p.predict(image, (512, 512), detail=detail)
    model = p.members[0].model
    want = predict_crops(model, crop_cells(image, labels, ids, 48), batch_size=8)
    np.testing.assert_allclose(detail.steps["m0"]["step2"], want, atol=1e-6)
    other = predict_crops(model, crop_cells(image, labels, ids, 32), batch_size=8)
    assert not np.allclose(other, want, atol=1e-6)


def test_default_when_neither_names_one(tiny_manifest):
    model = PuzzleCAM("resnet10t", pretrained=False)  # built here: no checkpoint meta
    cfg = load_config(tiny_manifest)
    assert crop_size_of(model, cfg.replace(crop_size=None)) == (DEFAULT_CROP_SIZE, "default")
    assert crop_size_of(model, cfg) == (32, "manifest")


def test_bundled_manifest_uses_its_checkpoints_crop_size():
    cfg = load_config(DEFAULT_MANIFEST)
    assert cfg.crop_size is None
    assert Predictor.from_config(cfg).members[0].crop_size == 128  # the demo checkpoint's


@pytest.mark.parametrize("bad", [0, -32])
def test_bad_crop_size_is_one_line(tmp_path, tiny_checkpoint, bad):
    with pytest.raises(ConfigError, match="crop_size"):
        _manifest(tmp_path, tiny_checkpoint, crop_size=bad)
