"""The third-place team's checkpoints run exactly as their code runs them (issue 20).

The team's structure, input pipeline and CAM are re-created in ``tests/team_reference.py``;
random weights (BatchNorm statistics included) are saved in each of their file shapes and
read by the kernel. Class maps must equal the team structure's own forward on the same
input to ``1e-4 x max|F|``; CAMs equal their ``make_cam`` to 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from hpa_kernel.config import load_config
from hpa_kernel.formats.images import channel_path, read_rgby
from hpa_kernel.stages.inputs import ImageInput, mpware_pixels
from hpa_kernel.stages.model import CheckpointError, FoldGroup, PuzzleCAM, load_checkpoint, normalize
from hpa_kernel.stages.mpware import load_mpware, parse_run_name
from hpa_kernel.stages.predictor import Predictor, ScoreDetail, load_classifier
from hpa_kernel.stages.step2 import crop_cells, predict_crops
from hpa_kernel.tools.synthetic import make_image
from team_reference import TeamSiamese, randomize, save_team_file, team_ensemble, team_input, team_make_cam


def kernel_input(model, rgby: np.ndarray) -> torch.Tensor:
    """The kernel's full-image input of ``model`` for a raw image: its pipeline's pixels at its
    ``image_size`` (``ImageInput``, as the predictor makes them), normalised by its mean/std."""
    cfg = model.data_config
    x = normalize(ImageInput(rgby).pixels(model.input_pipeline, cfg["image_size"]), cfg["mean"], cfg["std"])
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]

BACKBONE = "resnet10t"  # the fast loop's small backbone; seresnext50_32x4d in the slow test
RUN = f"siamese_{BACKBONE}_512_384_RGBY_fp16_CV4_v2.0"


def team_path(root: Path, fold: int = 1, run: str = RUN) -> Path:
    return root / run / f"fold{fold}" / "stage1" / "snapshots" / "model_best.pt"


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    bound = rel * np.abs(ref).max()
    assert np.abs(ours - ref).max() <= bound, f"max diff {np.abs(ours - ref).max():.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def team():
    torch.manual_seed(0)
    return randomize(TeamSiamese(BACKBONE), seed=1)


def write_planes(folder: Path, image_id: str, rgby: np.ndarray) -> list[np.ndarray]:
    """The four channel PNGs of one image; returns the planes as their PIL reader sees them."""
    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(("red", "green", "blue", "yellow")):
        cv2.imwrite(str(channel_path(folder, image_id, name)), rgby[:, :, c])
    return [np.asarray(Image.open(channel_path(folder, image_id, n))) for n in ("red", "green", "blue", "yellow")]


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory):
    """A 512 px 8-bit and a 1024 px 16-bit synthetic image as files: ``{name: (rgby, planes)}``."""
    folder = tmp_path_factory.mktemp("raw")
    out = {}
    for name, side, depth in (("u8_512", 512, 8), ("u16_1024", 1024, 16)):
        rgby = make_image(np.random.default_rng(side), side, side, depth=depth).rgby
        planes = write_planes(folder, name, rgby)
        out[name] = (read_rgby(folder, name), planes)
    return out


@pytest.mark.parametrize("shape", ["siamese", "plain", "dataparallel", "cuda"])
def test_each_team_file_shape_gives_the_team_class_maps(tmp_path, team, raw_images, shape):
    path = save_team_file(team, team_path(tmp_path), shape)
    model = load_mpware(path)
    assert model.meta["input"] == "mpware" and model.meta["image_size"] == 512 and model.meta["crop_size"] == 384
    x = team_input(raw_images["u8_512"][1])  # their preprocessed input
    with torch.no_grad():
        want = team(x)["single_features"]
        close(model.class_maps(x), want)
        logits, _ = model.forward_with_maps(x)
        close(logits, team(x)["single_logits"])


@pytest.mark.parametrize("name", ["u8_512", "u16_1024"])
def test_the_kernel_feeds_a_raw_image_the_team_way(tmp_path, team, raw_images, name):
    rgby, planes = raw_images[name]
    model = load_mpware(save_team_file(team, team_path(tmp_path)))
    ours, theirs = kernel_input(model, rgby), team_input(planes)
    assert ours.shape == (1, 4, 512, 512) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    with torch.no_grad():
        close(model.class_maps(ours), team(theirs)["single_features"])


@pytest.mark.slow
def test_the_kernel_input_of_a_2048_px_16_bit_image(tmp_path, team):
    rgby = make_image(np.random.default_rng(2048), 2048, 2048, depth=16).rgby
    planes = write_planes(tmp_path, "big", rgby)
    model = load_mpware(save_team_file(team, team_path(tmp_path)))
    ours, theirs = kernel_input(model, read_rgby(tmp_path, "big")), team_input(planes)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    with torch.no_grad():
        close(model.class_maps(ours), team(theirs)["single_features"])


def test_cams_equal_the_team_make_cam():
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 19, 16, 16, generator=g) * 3
    maps[0, 4] = -1.0  # a map negative everywhere
    maps[1, 7] = 0.0
    maps[1, 8, 3, 3] = 5e-6  # a positive value under the 1e-5 step
    np.testing.assert_allclose(PuzzleCAM.cams(maps, "relu_max").numpy(), team_make_cam(maps).numpy(), atol=1e-6)


def test_a_fold_group_is_the_team_ensemble(tmp_path, raw_images):
    folds = [randomize(TeamSiamese(BACKBONE), seed=s) for s in (11, 12, 13)]
    paths = [save_team_file(m, team_path(tmp_path, k + 1)) for k, m in enumerate(folds)]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classifiers": [{"paths": [str(p.relative_to(tmp_path)) for p in paths],
                                                     "format": "mpware", "crop_size": 64}]}))
    entry = load_config(manifest).classifiers[0]
    group = load_classifier(entry)
    assert isinstance(group, FoldGroup) and group.meta["folds"] == 3 and group.data_config["crop_size"] == 64
    x = team_input(raw_images["u8_512"][1])
    with torch.no_grad():
        want = team_ensemble(folds, x)
        logits, maps = group.forward_with_maps(x)
    close(maps, want["single_features"])
    close(logits, want["single_logits"])
    close(group.cams(maps), team_make_cam(want["single_features"]), rel=1e-6)
    # Step 2: crop probabilities from the averaged logits
    crops = np.random.default_rng(0).random((3, 4, 64, 64), dtype=np.float32)
    with torch.no_grad():
        norm = normalize(torch.from_numpy(crops), group.data_config["mean"], group.data_config["std"])
        ref = torch.sigmoid(team_ensemble(folds, norm)["single_logits"]).numpy()
    np.testing.assert_allclose(predict_crops(group, crops, batch_size=2), ref, atol=1e-5)


def one_line(err: Exception, path: Path) -> str:
    text = str(err)
    assert "\n" not in text and str(path) in text, text
    return text


def test_a_file_of_another_backbone_is_refused_in_one_line(tmp_path, team):
    path = save_team_file(team, team_path(tmp_path, run="siamese_resnet18_512_384_RGBY_fp16_CV4_v2.0"))
    with pytest.raises(CheckpointError) as info:
        load_mpware(path)
    assert "resnet18" in one_line(info.value, path)


def test_missing_or_contradicting_settings_are_one_line(tmp_path, team):
    bare = save_team_file(team, tmp_path / "model_best.pt")
    with pytest.raises(CheckpointError) as info:
        load_mpware(bare)
    assert "backbone and image_size" in one_line(info.value, bare)
    model = load_mpware(bare, backbone=BACKBONE, image_size=512)  # the flags fill what the name lacks
    assert model.meta["crop_size"] == 384 and model.meta["source"] == "mpware:model_best.pt"
    named = save_team_file(team, team_path(tmp_path))
    with pytest.raises(CheckpointError) as info:
        load_mpware(named, backbone="resnet18")
    assert "says" in one_line(info.value, named)


def test_keys_that_are_not_the_team_s_are_refused(tmp_path, team):
    state = dict(team.state_dict(), extra=torch.zeros(1))
    path = team_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_mpware(path)
    assert "extra" in one_line(info.value, path)
    torch.save({k: v for k, v in team.state_dict().items() if "mclassifier" not in k}, path)
    with pytest.raises(CheckpointError):
        load_mpware(path)


def test_our_loader_points_a_team_file_to_its_format(tmp_path, team):
    path = save_team_file(team, team_path(tmp_path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert '"format": "mpware"' in one_line(info.value, path)


def test_run_folder_names():
    run = parse_run_name("/kaggle/input/hpa-models/siamese_regnety_064_512_384_RGBY_CV4_v2.0/fold2/stage1/snapshots/model_best.pt")
    assert (run.backbone, run.image_size, run.crop_size, run.channels) == ("regnety_064", 512, 384, "RGBY")
    run = parse_run_name("m/siamese_gluon_seresnext101_32x4d_512_384_RGBY_fp16_CV4_v2.0/fold1/model_best.pt")
    assert run.backbone == "gluon_seresnext101_32x4d" and run.mtype == "siamese"
    assert parse_run_name("weights/model_best.pt") is None


def test_import_cli_writes_our_checkpoint(tmp_path, team, raw_images):
    src = save_team_file(team, team_path(tmp_path), "cuda")
    dst = tmp_path / "imported.pt"
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.tools.import_checkpoint", str(src), "--out", str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, meta = load_checkpoint(dst)
    assert meta["input"] == "mpware" and meta["backbone"] == BACKBONE and meta["crop_size"] == 384
    x = kernel_input(model, raw_images["u8_512"][0])
    with torch.no_grad():
        close(model.class_maps(x), team(team_input(raw_images["u8_512"][1]))["single_features"])
    bare = save_team_file(team, tmp_path / "loose" / "model_best.pt")
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.tools.import_checkpoint", str(bare), "--out", str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--backbone" in r.stderr


def test_the_predictor_feeds_each_model_its_own_pipeline(tmp_path, team, tiny_checkpoint, raw_images):
    team_file = save_team_file(team, team_path(tmp_path))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classifiers": [
        {"path": str(team_file.relative_to(tmp_path)), "format": "mpware", "crop_size": 48},
        {"path": str(tiny_checkpoint), "weight": 0.5}]}))
    predictor = Predictor.from_config(load_config(manifest, allow_outside=True))
    assert [m.model.input_pipeline for m in predictor.members] == ["mpware", "hpa_kernel"]
    rgby = raw_images["u16_1024"][0]
    image = ImageInput(rgby)
    detail = ScoreDetail()
    labels, ids, _ = predictor.predict(image, (1024, 1024), detail=detail)
    assert len(ids) > 0
    team_pixels = image.pixels("mpware", 512)
    assert team_pixels is image.pixels("mpware", 512)  # made once per image
    np.testing.assert_array_equal(team_pixels, mpware_pixels(rgby, 512))
    want = predict_crops(predictor.members[0].model, crop_cells(team_pixels, labels, ids, 48))
    np.testing.assert_allclose(detail.steps["m0"]["step2"], want, atol=1e-6)
    with pytest.raises(ValueError, match="raw image"):  # working pixels alone cannot feed the team's model
        predictor.predict(image.image, (1024, 1024))


@pytest.mark.slow
def test_a_dry_run_with_a_team_file_in_the_manifest(tmp_path):
    """README command 1's dry run (bundled samples, local mAP) with a team fold group as the classifier."""
    folder = tmp_path / "weights"
    paths = [save_team_file(randomize(TeamSiamese(BACKBONE), seed=s), team_path(folder, k + 1), shape)
             for k, (s, shape) in enumerate(((21, "cuda"), (22, "dataparallel")))]
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({
        "segmentation": {"method": "classic"},
        "classifiers": [{"paths": [str(p.relative_to(folder)) for p in paths], "format": "mpware", "crop_size": 64}],
        "batch_size": 16}))
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.submit", "--weights", str(manifest), "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation: OK" in r.stdout and "local mAP" in r.stdout
    rows = (tmp_path / "submission.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(row.split(",")[3] for row in rows)
    assert "input mpware" in r.stderr


@pytest.mark.slow
def test_seresnext50_team_file(tmp_path, raw_images):
    team50 = randomize(TeamSiamese("seresnext50_32x4d"), seed=50)
    path = save_team_file(team50, team_path(tmp_path, run="siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0"), "cuda")
    model = load_mpware(path)
    rgby, planes = raw_images["u16_1024"]
    with torch.no_grad():
        close(model.class_maps(kernel_input(model, rgby)), team50(team_input(planes))["single_features"])


def test_the_example_manifest_names_the_team_s_four_folds():
    """configs/mpware_seresnext50_4folds.json (README): one fold group whose run folder says it all."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "mpware_seresnext50_4folds.json",
                         allow_outside=True)
    (entry,) = config.classifiers
    assert entry.format == "mpware" and len(entry.paths) == 4 and entry.backbone is None
    runs = {parse_run_name(p) for p in entry.paths}
    (run,) = runs
    assert (run.backbone, run.image_size, run.crop_size, run.channels) == ("seresnext50_32x4d", 512, 384, "RGBY")
    assert [p.parts[-4] for p in entry.paths] == ["fold1", "fold2", "fold3", "fold4"]
