"""The manifest's Step 1 / ensemble options reach the predictor: ``step1.cam`` decides the
CAMs Step 1 intersects with the cells, per-class ``step_weights`` the ensemble of each class."""

from __future__ import annotations

import json

import numpy as np

from hpa_kernel.config import load_config
from hpa_kernel.formats.images import resize_rgby
from hpa_kernel.stages.model import classify_image
from hpa_kernel.stages.predictor import Predictor, ScoreDetail
from hpa_kernel.stages.step1 import step1_scores
from hpa_kernel.tools.synthetic import make_image

from conftest import write_manifest


def _predictor(tmp_path, checkpoint, **raw_changes) -> Predictor:
    path = write_manifest(tmp_path, checkpoint)
    raw = json.loads(path.read_text())
    raw.update(raw_changes)
    path.write_text(json.dumps(raw))
    return Predictor.from_config(load_config(path))


def _image() -> np.ndarray:
    return resize_rgby(make_image(np.random.default_rng(5), 512, 512).rgby, 512)


def test_step1_cam_option_decides_the_cams_of_step1(tmp_path, tiny_checkpoint):
    image = _image()
    got = {}
    for norm in ("relu_max", "minmax"):
        p = _predictor(tmp_path / norm, tiny_checkpoint, step1={"cam": norm})
        detail = ScoreDetail()
        labels, ids, _ = p.predict(image, (512, 512), detail=detail)
        probs, cams = classify_image(p.members[0].model, image, cam_norm=norm)
        want = step1_scores(cams, probs, labels, ids)
        np.testing.assert_array_equal(detail.steps["m0"]["step1"], want)
        got[norm] = want
    assert not np.array_equal(got["relu_max"], got["minmax"])


def test_per_class_step_weights_weigh_each_class(tmp_path, tiny_checkpoint):
    w1 = [1.0] * 10 + [0.0] * 9  # classes 0-9 from Step 1 only, 10-18 from Step 2 only
    p = _predictor(tmp_path, tiny_checkpoint, step_weights={"step1": w1, "step2": [1.0 - w for w in w1]})
    detail = ScoreDetail()
    p.predict(_image(), (512, 512), detail=detail)
    steps = detail.steps["m0"]
    np.testing.assert_allclose(steps["ens"][:, :10], steps["step1"][:, :10], rtol=1e-6)
    np.testing.assert_allclose(steps["ens"][:, 10:], steps["step2"][:, 10:], rtol=1e-6)
