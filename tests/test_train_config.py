import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from hpa_kernel.train.config import RECIPE_AUGMENT, TrainConfig, TrainConfigError, load_train_config, parse_override

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "hpa_seresnext50_512.json"
DEMO = RECIPE.with_name("demo.json")


def test_defaults_are_the_recipe():
    c = TrainConfig()
    assert (c.backbone, c.pretrained, c.image_size, c.train_crop, c.batch_size, c.epochs) == (
        "seresnext50_32x4d", True, 512, 384, 36, 48)
    assert (c.lr, c.beta1, c.plateau_factor, c.plateau_patience, c.min_lr) == (3e-4, 0.9, 0.3, 8, 1e-6)
    assert (c.gamma, c.best_from_epoch, c.amp, c.sampler, c.sampler_clip_rank, c.n_folds) == (
        0.5, 2, True, "weighted", 3, 4)


def test_recipe_config_file_spells_out_the_defaults():
    raw = json.loads(RECIPE.read_text())
    c = load_train_config(RECIPE)
    d = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("index_csv", "out", "pretrained_file"):
            continue
        assert getattr(c, f.name) == getattr(d, f.name), f.name
    assert raw["augment"] == RECIPE_AUGMENT  # every group written out, equal to the code's
    assert c.pretrained_file == "pretrained/seresnext50_32x4d.pth"


def test_demo_config_loads_and_trains_on_image_labels_only():
    c = load_train_config(DEMO)
    assert c.pretrained is False and c.val_cells_csv is None and c.gamma == 0.5
    assert c.train_crop / c.image_size == 384 / 512  # the recipe's crop ratio, scaled down
    assert c.augment.groups.keys() == RECIPE_AUGMENT.keys()


def test_json_and_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"epochs": 3, "backbone": "resnet10t", "augment": {"noise": {"p": 0.1}}}))
    c = load_train_config(p, {"epochs": 5, "out": None, "augment.blur.p": 0.0})
    assert c.epochs == 5 and c.backbone == "resnet10t" and c.out == TrainConfig().out
    assert c.augment.groups["noise"].p == 0.1 and c.augment.groups["blur"].p == 0.0
    assert "epochs" not in c.defaults_used() and c.defaults_used()["batch_size"] == 36


def test_yaml(tmp_path):
    importlib.import_module("yaml")
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\naugment: none\n")
    c = load_train_config(p)
    assert c.epochs == 2 and c.augment.groups == {}


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"epoch": 3}, "unknown config key"),
        ({"cells_csv": "x.csv"}, "unknown config key.*cells_csv"),  # training on cell truth is gone
        ({"augment": {"noise": {"prob": 1}}}, r"augment\.noise: unknown key"),
        ({"augment": {"noise": {"p": 1.5}}}, r"augment\.noise\.p"),
        ({"image_size": 200}, "image_size: 200 must be a multiple of 64"),
        ({"train_crop": 600}, "train_crop"),
        ({"batch_size": "36"}, r"batch_size: expected int, got str"),
        ({"lr": True}, r"lr: expected float"),
        ({"pretrained": "yes"}, r"pretrained: expected bool"),
        ({"sampler": "balanced"}, "sampler"),
        ({"fold": 4}, "fold: 4"),
        ({"resume": "a.pt", "init_from": "b.pt"}, "init_from"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, raw, match):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(TrainConfigError, match=match) as e:
        load_train_config(p)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TrainConfigError, match="not found"):
        load_train_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TrainConfigError, match="not valid JSON"):
        load_train_config(tmp_path / "bad.json")


def test_check_files_names_the_missing_one(tmp_path):
    index = tmp_path / "index.csv"
    index.write_text("ID,Label,path\n")
    c = TrainConfig.from_dict({"index_csv": str(tmp_path / "none.csv"), "pretrained": False})
    with pytest.raises(TrainConfigError, match=r"index_csv: file .*none.csv not found"):
        c.check_files()
    c = TrainConfig.from_dict({"index_csv": str(index), "pretrained": False, "resume": str(tmp_path / "l.pt")})
    with pytest.raises(TrainConfigError, match=r"resume: file .*l.pt not found"):
        c.check_files()
    c = TrainConfig.from_dict({"index_csv": str(index), "pretrained_file": str(tmp_path / "w.pth")})
    with pytest.raises(TrainConfigError, match=r"pretrained_file: .*w.pth not found; get it on a machine with "
                                               r"internet.*seresnext50_32x4d.*timm/seresnext50_32x4d"):
        c.check_files()
    TrainConfig.from_dict({"index_csv": str(index), "pretrained": False}).check_files()


def test_parse_override():
    assert parse_override("epochs=3") == ("epochs", 3)
    assert parse_override("augment.noise.p=0.3") == ("augment.noise.p", 0.3)
    assert parse_override("init_from=null") == ("init_from", None)
    with pytest.raises(TrainConfigError):
        parse_override("epochs")


def test_set_may_clear_a_key(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"train_crop": 256}))
    assert load_train_config(p, {"train_crop": None}).train_crop == 256  # argparse default: ignored
    assert load_train_config(p, None, [parse_override("train_crop=null")]).train_crop is None
