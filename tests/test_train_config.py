import importlib
import json

import pytest

from hpa_kernel.train.config import TrainConfig, TrainConfigError, load_train_config, parse_override


def test_defaults_follow_the_write_up():
    c = TrainConfig()
    assert (c.lr, c.beta1, c.plateau_factor, c.plateau_patience, c.gamma) == (3e-4, 0.9, 0.3, 8, 0.25)
    assert c.n_folds == 4 and c.sampler_clip_class == 8 and c.pretrained is False


def test_json_and_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 3, "backbone": "resnet10t", "augment": {"p": 0.1}}))
    c = load_train_config(p, {"epochs": 5, "out": None, "augment.level": "light"})
    assert c.epochs == 5 and c.backbone == "resnet10t" and c.out == TrainConfig().out
    assert c.augment.p == 0.1 and c.augment.level == "light"


def test_yaml(tmp_path):
    importlib.import_module("yaml")
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\naugment:\n  level: none\n")
    c = load_train_config(p)
    assert c.epochs == 2 and c.augment.level == "none"


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"epoch": 3}, "unknown config key"),
        ({"augment": {"prob": 1}}, "unknown augment key"),
        ({"image_size": 200}, "multiple of 64"),
        ({"sampler": "balanced"}, "sampler"),
        ({"fold": 4}, "fold 4"),
    ],
)
def test_bad_configs(tmp_path, raw, match):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(TrainConfigError, match=match):
        load_train_config(p)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TrainConfigError, match="not found"):
        load_train_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TrainConfigError, match="not valid JSON"):
        load_train_config(tmp_path / "bad.json")


def test_parse_override():
    assert parse_override("epochs=3") == ("epochs", 3)
    assert parse_override("augment.level=none") == ("augment.level", "none")
    assert parse_override("cells_csv=null") == ("cells_csv", None)
    with pytest.raises(TrainConfigError):
        parse_override("epochs")


def test_set_may_clear_a_key(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"cells_csv": "x.csv"}))
    assert load_train_config(p, {"cells_csv": None}).cells_csv == "x.csv"  # argparse default: ignored
    assert load_train_config(p, None, [parse_override("cells_csv=null")]).cells_csv is None
