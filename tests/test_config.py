"""The manifest reader (``hpa_kernel.config``): values are checked where they are read."""

from __future__ import annotations

import pytest

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import MAX_TOP_CLASSES, ConfigError, config_from_dict


def test_the_top_classes_bound_is_the_number_of_classes():
    assert MAX_TOP_CLASSES == NUM_CLASSES
    assert config_from_dict({"top_classes": NUM_CLASSES}, root=".").top_classes == NUM_CLASSES
    with pytest.raises(ConfigError, match="top_classes"):
        config_from_dict({"top_classes": NUM_CLASSES + 1}, root=".")


@pytest.mark.parametrize("raw, field", [
    ({"top_classes": True}, "top_classes"),
    ({"min_confidence": float("inf")}, "min_confidence"),
    ({"min_confidence": 1.5}, "min_confidence"),
    ({"step_weights": {"step1": 0, "step2": 0}}, "step_weights"),
    ({"step_weights": [0.5, 0.5]}, "step_weights"),
    ({"step_weights": {"step1": [0.5] * 18, "step2": 0.5}}, "step_weights.step1"),
    ({"step_weights": {"step1": [0.5] * 18 + [-1], "step2": 0.5}}, "step_weights.step1[18]"),
    ({"step_weights": {"step1": [1.0] * 18 + [0.0], "step2": [0.0] * 19}}, "for class 18"),
    ({"step1": {"cam": "softmax"}}, "step1.cam"),
    ({"step1": {"norm": "minmax"}}, "step1: unknown key 'norm'"),
    ({"image_size": 500}, "image_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"segmentation": {"method": "classic", "batch_size": 0}}, "segmentation.batch_size"),
    ({"classifiers": [{"weight": 1.0}]}, "classifiers[0].path"),
    ({"classifiers": [3]}, "classifiers[0]"),
    ({"files": []}, "files"),
])
def test_a_bad_value_names_its_field(raw, field):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, root=".")
    assert field in str(info.value) and "\n" not in str(info.value)


def test_the_defaults_and_the_path_shorthand_still_load():
    cfg = config_from_dict({"classifiers": ["m.pt", {"path": "n.pt", "weight": 2}]}, root=".")
    assert [c.weight for c in cfg.classifiers] == [1.0, 2.0]
    assert (cfg.top_classes, cfg.min_confidence, cfg.image_size) == (18, 0.0, 512)


def test_per_class_step_weights_and_the_cam_option_load():
    w1 = [0.25] * 18 + [1.0]
    cfg = config_from_dict({"step_weights": {"step1": w1, "step2": [0.75] * 18 + [0.0]},
                            "step1": {"cam": "minmax"}}, root=".")
    assert cfg.step1_weight == tuple(w1) and cfg.step2_weight[18] == 0.0
    assert cfg.use_step1 and cfg.use_step2 and cfg.cam_norm == "minmax"
    default = config_from_dict({}, root=".")
    assert default.cam_norm == "relu_max" and (default.step1_weight, default.step2_weight) == (0.5, 0.5)
    assert not config_from_dict({"step_weights": {"step1": 1, "step2": [0.0] * 19}}, root=".").use_step2


def test_every_cam_name_a_manifest_may_give_is_one_the_model_computes():
    import torch

    from hpa_kernel.config import CAM_NORMS
    from hpa_kernel.stages.model import PuzzleCAM

    maps = torch.randn(19, 8, 8)
    assert CAM_NORMS[0] == "relu_max"
    for norm in CAM_NORMS:
        cams = PuzzleCAM.cams(maps, norm)
        assert cams.shape == maps.shape and 0 <= float(cams.min()) and float(cams.max()) <= 1
    with pytest.raises(ValueError, match="unknown CAM normalisation"):
        PuzzleCAM.cams(maps, "softmax")
