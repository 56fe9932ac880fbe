"""Out-of-fold export: a validation fold through the kernel's own predictor and per-cell writer."""

import json

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.config import KernelConfig
from hpa_kernel.formats.cells import read_cells, scores
from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint
from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.oof import IMAGE_COLS, OOFOptions, export_oof, main, read_image_table
from hpa_kernel.train.prepare import prepare_cache

SIZE = 192


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("oof")
    write_dataset(root / "data", 8, seed=1005, sizes=SIZE, depth=8, split="train", progress=False)
    s = prepare_cache(root / "data" / "train.csv", [root / "data" / "train"], root / "cache", size=SIZE,
                      workers=1, n_folds=2, progress=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(PuzzleCAM("test_resnet"), root / "m.pt", image_size=128, crop_size=64)
    return root, s.index_path, ckpt


def _fold(index, fold):
    return pd.read_csv(index).query(f"fold == {fold}")


def test_the_export_is_what_submit_save_cells_writes(setup, tmp_path):
    """Run from the original PNGs, the fold's export is byte for byte the per-cell export of
    ``submit --save-cells`` over the same images with a manifest naming the checkpoint."""
    from hpa_kernel.submit import main as submit

    root, index, ckpt = setup
    write_dataset(tmp_path / "test", 8, seed=1005, sizes=SIZE, depth=8, split="test", progress=False)  # same images
    manifest = tmp_path / "manifest.json"
    (tmp_path / "m.pt").write_bytes(ckpt.read_bytes())
    manifest.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "image_size": SIZE, "top_classes": 5}))
    assert submit(["--data-dir", str(tmp_path / "test"), "--weights", str(manifest), "--out", str(tmp_path / "s.csv"),
                   "--save-cells", str(tmp_path / "kernel"), "--device", "cpu", "--no-verify"]) == 0
    images = export_oof(index, ckpt, 1, tmp_path / "oof", KernelConfig(image_size=SIZE, top_classes=5),
                        sources=[root / "data" / "train"], progress=False)
    ours, kernel = read_cells(tmp_path / "oof"), read_cells(tmp_path / "kernel")
    assert ours.models == kernel.models == ["m0"] and set(images["ID"]) == set(_fold(index, 1)["ID"])
    want = kernel.cells[kernel.cells["ID"].isin(set(images["ID"]))].reset_index(drop=True)
    assert len(ours.cells) > 10 and len(want) == len(ours.cells)
    pd.testing.assert_frame_equal(ours.cells.sort_values(["ID", "cell_id"]).reset_index(drop=True),
                                  want.sort_values(["ID", "cell_id"]).reset_index(drop=True))
    classes = pd.DataFrame(scores(ours.cells) > 0).groupby(ours.cells["ID"].to_numpy()).any().sum(axis=1)
    assert classes.max() == 5  # the manifest's top 5 classes per image


def test_the_image_table_has_the_labels_and_the_full_image_forward(setup, tmp_path):
    from hpa_kernel.stages.inputs import ImageInput
    from hpa_kernel.stages.model import classify_image, load_checkpoint

    root, index, ckpt = setup
    images = export_oof(index, ckpt, 0, tmp_path / "oof", KernelConfig(image_size=SIZE),
                        opts=OOFOptions(limit=2), progress=False)
    back = read_image_table(tmp_path / "oof")
    assert list(back.columns) == ["ID", "fold", "Label", *IMAGE_COLS] and len(back) == 2
    rows = _fold(index, 0).iloc[:2]
    assert back["ID"].tolist() == rows["ID"].astype(str).tolist() and back["Label"].tolist() == rows["Label"].tolist()
    model = load_checkpoint(ckpt)[0]
    cache = np.load(root / "cache" / rows["path"].iloc[0])
    probs, _ = classify_image(model, ImageInput(cache, SIZE).pixels("hpa_kernel", 128))
    assert np.allclose(back[IMAGE_COLS].to_numpy()[0], probs, atol=1e-6)
    assert np.allclose(back[IMAGE_COLS].to_numpy(), images[IMAGE_COLS].to_numpy(), atol=1e-8)


def test_both_steps_run_whatever_the_manifest_weighs(setup, tmp_path):
    root, index, ckpt = setup
    export_oof(index, ckpt, 0, tmp_path / "oof", KernelConfig(image_size=SIZE, step1_weight=0.0, step2_weight=1.0),
               opts=OOFOptions(limit=1), progress=False)
    cells = read_cells(tmp_path / "oof").cells
    s1, s2, ens = (scores(cells, "m0", s) for s in ("step1", "step2", "ens"))
    assert len(cells) and np.isfinite(s1).all() and ((s2 > 0) & (s2 < 1)).all()
    assert np.allclose(ens, 0.5 * s1 + 0.5 * s2, atol=1e-6)


def test_empty_fold_is_an_error(setup, tmp_path):
    root, index, ckpt = setup
    with pytest.raises(ValueError, match="fold 3 has no images"):
        export_oof(index, ckpt, 3, tmp_path / "oof", progress=False)


def test_cli_writes_the_export_folder(setup, tmp_path, capsys):
    root, index, ckpt = setup
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"image_size": SIZE}))
    assert main(["--index-csv", str(index), "--checkpoint", str(ckpt), "--fold", "0", "--limit", "2",
                 "--manifest", str(manifest), "--device", "auto", "--out", str(tmp_path / "oof")]) == 0
    assert "2 images of fold 0" in capsys.readouterr().out
    export = read_cells(tmp_path / "oof")
    assert len(export.images) == 2 and len(read_image_table(tmp_path / "oof")) == 2
    assert (export.images["ImageWidth"] == SIZE).all()


def test_a_loaded_model_gives_the_same_export_as_its_file(setup, tmp_path):
    from hpa_kernel.stages.model import load_checkpoint

    root, index, ckpt = setup
    config, opts = KernelConfig(image_size=SIZE), OOFOptions(limit=2)
    export_oof(index, ckpt, 1, tmp_path / "a", config, opts=opts, progress=False)
    export_oof(index, load_checkpoint(ckpt)[0], 1, tmp_path / "b", config, opts=opts, progress=False)
    pd.testing.assert_frame_equal(read_cells(tmp_path / "a").cells, read_cells(tmp_path / "b").cells)
