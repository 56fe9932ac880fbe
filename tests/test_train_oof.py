"""Out-of-fold export: segmentation + Step 1 + Step 2 per cell on a fold's images."""

import numpy as np
import pandas as pd
import pytest


from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint
from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.oof import IMAGE_COLS, STEP1_COLS, STEP2_COLS, OOFOptions, export_oof_tables, main
from hpa_kernel.train.prepare import prepare_cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("oof")
    write_dataset(root / "data", 8, seed=1005, sizes=192, depth=8, split="train", progress=False)
    s = prepare_cache(root / "data" / "train.csv", [root / "data" / "train"], root / "cache", size=192,
                      workers=1, n_folds=2, progress=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(PuzzleCAM("test_resnet"), root / "m.pt", image_size=128, crop_size=64)
    return root, s.index_path, ckpt


def cached_image(row, size):
    """The fold image as the export reads it: the prepared cache (uint8 RGBY), resized."""
    from hpa_kernel.formats.images import resize_rgby

    return resize_rgby(np.load(row.path), size)


def test_export_rows_per_cell(setup):
    root, index, ckpt = setup
    t = export_oof_tables(index, ckpt, fold=1, opts=OOFOptions(size=192), progress=False)[0]
    ids = set(pd.read_csv(index).query("fold == 1")["ID"])
    assert set(t["ID"]) <= ids and len(t) > 0
    assert list(t.columns[:10]) == ["ID", "fold", "cell_id", "y0", "x0", "y1", "x1", "width", "height", "Label"]
    assert t.columns[10:].tolist() == STEP1_COLS + STEP2_COLS
    s1, s2 = t[STEP1_COLS].to_numpy(), t[STEP2_COLS].to_numpy()
    assert np.isfinite(s1).all() and (s1 >= 0).all() and (s1 <= 1).all()
    assert ((s2 > 0) & (s2 < 1)).all()  # sigmoid of a real forward
    assert (t["y1"] > t["y0"]).all() and (t["x1"] > t["x0"]).all() and (t[["y1", "x1"]] <= 192).all().all()
    assert (t["width"] == 192).all()
    assert not t.duplicated(["ID", "cell_id"]).any()


def test_step2_matches_the_kernel_functions(setup):
    from hpa_kernel.stages.model import load_checkpoint
    from hpa_kernel.stages.segmentation import create_segmenter as Segmenter
    from hpa_kernel.stages.step2 import crop_cells, predict_crops

    root, index, ckpt = setup
    t = export_oof_tables(index, ckpt, fold=0, opts=OOFOptions(size=192, limit=1), progress=False)[0]
    row = next(pd.read_csv(index).query("fold == 0").assign(path=lambda d: str(root / "cache") + "/" + d["path"])
               .itertuples(index=False))
    image = cached_image(row, 192)
    labels = Segmenter().segment(image[None], [(192, 192)])[0].cells
    model, meta = load_checkpoint(ckpt)
    ids = t["cell_id"].to_numpy()
    want = predict_crops(model, crop_cells(image, labels, ids, 64), mean=meta["mean"], std=meta["std"])
    assert np.allclose(t[STEP2_COLS].to_numpy(), want, atol=1e-5)


def test_cli_csv_and_parquet(setup, tmp_path, capsys):
    root, index, ckpt = setup
    args = ["--index-csv", str(index), "--checkpoint", str(ckpt), "--fold", "0", "--size", "192", "--limit", "2"]
    assert main(args + ["--out", str(tmp_path / "oof.csv"), "--device", "auto"]) == 0
    t = pd.read_csv(tmp_path / "oof.csv")
    assert t["ID"].nunique() <= 2 and "cells of" in capsys.readouterr().out
    images = pd.read_csv(tmp_path / "oof.images.csv")  # the per-image file beside the per-cell one
    assert list(images.columns) == ["ID", "fold", "width", "height", "Label", "n_cells", *IMAGE_COLS]
    assert len(images) == 2 and set(t["ID"]) <= set(images["ID"])
    assert (images.set_index("ID")["n_cells"] == t.groupby("ID").size().reindex(images["ID"], fill_value=0)).all()
    p = images[IMAGE_COLS].to_numpy()
    assert ((p > 0) & (p < 1)).all()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert main(args + ["--out", str(tmp_path / "oof.parquet")]) == 2  # one line naming pyarrow
    else:
        assert main(args + ["--out", str(tmp_path / "oof.parquet")]) == 0
        assert len(pd.read_parquet(tmp_path / "oof.parquet")) == len(t)


def test_empty_fold_is_an_error(setup):
    root, index, ckpt = setup
    with pytest.raises(ValueError, match="fold 3 has no images"):
        export_oof_tables(index, ckpt, fold=3, progress=False)


def test_image_probabilities_are_the_full_image_forward(setup):
    from hpa_kernel.stages.model import classify_image, load_checkpoint

    root, index, ckpt = setup
    cells, images = export_oof_tables(index, ckpt, fold=0, opts=OOFOptions(size=192, limit=1), progress=False)
    row = next(pd.read_csv(index).query("fold == 0").assign(path=lambda d: str(root / "cache") + "/" + d["path"])
               .itertuples(index=False))
    model, _ = load_checkpoint(ckpt)
    probs, _ = classify_image(model, cached_image(row, 192))
    assert images["ID"].tolist() == [row.ID]
    assert np.allclose(images[IMAGE_COLS].to_numpy()[0], probs, atol=1e-6)


def test_oof_writes_the_save_cells_table(setup, tmp_path):
    """The validation fold's per-cell export: the folder ``submit --save-cells`` writes (same
    reader, same columns), with the OOF table's Step 1 / Step 2 scores as model m0."""
    from hpa_kernel.formats.cells import read_cells, read_labels, scores
    from hpa_kernel.stages.ensemble import select_top_classes

    root, index, ckpt = setup
    table, images = export_oof_tables(index, ckpt, fold=1, opts=OOFOptions(size=192, limit=3), progress=False,
                                      cells_out=tmp_path / "cells")
    t = read_cells(tmp_path / "cells")
    assert t.models == ["m0"]
    assert list(t.images["ID"]) == list(images["ID"])
    assert list(t.images["n_cells"]) == list(images["n_cells"])
    assert list(t.cells.columns[:7]) == ["ID", "cell_id", "y0", "x0", "y1", "x1", "area"]
    assert list(t.cells.columns[7:26]) == [f"score_{c:02d}" for c in range(19)]
    assert t.cells[["ID", "cell_id"]].values.tolist() == table[["ID", "cell_id"]].values.tolist()
    # original size = working size here (192): the same boxes as the OOF table
    assert (t.cells[["y0", "x0", "y1", "x1"]].to_numpy() == table[["y0", "x0", "y1", "x1"]].to_numpy()).all()
    s1, s2, ens = (scores(t.cells, "m0", s) for s in ("step1", "step2", "ens"))
    assert np.allclose(s1, table[STEP1_COLS].to_numpy(), atol=1e-7)
    assert np.allclose(s2, table[STEP2_COLS].to_numpy(), atol=1e-7)
    assert np.allclose(ens, 0.5 * s1 + 0.5 * s2, atol=1e-6)
    # the class-selection rule is per image: top 18 classes by that image's best cell
    final, ids = scores(t.cells), t.cells["ID"].to_numpy()
    assert len(set(ids)) > 1
    for image_id in dict.fromkeys(ids):
        rows = ids == image_id
        assert np.array_equal(final[rows], select_top_classes(ens[rows], top_n=18, floor=0.0))
    image_id = t.images["ID"].iloc[0]
    assert read_labels(tmp_path / "cells", image_id).shape == (192, 192)


def test_cli_writes_the_cells_folder_beside_the_old_outputs(setup, tmp_path):
    from hpa_kernel.formats.cells import read_cells

    root, index, ckpt = setup
    assert main(["--index-csv", str(index), "--checkpoint", str(ckpt), "--fold", "0", "--size", "192", "--limit", "2",
                 "--device", "cpu", "--out", str(tmp_path / "oof.csv")]) == 0
    old = pd.read_csv(tmp_path / "oof.csv")  # the current OOF file stays as it was
    assert old.columns[10:].tolist() == STEP1_COLS + STEP2_COLS
    assert len(read_cells(tmp_path / "oof.cells").cells) == len(old)


def test_a_loaded_model_gives_the_same_table_as_its_file(setup):
    from hpa_kernel.stages.model import load_checkpoint

    root, index, ckpt = setup
    opts = OOFOptions(size=192, limit=2)
    from_file = export_oof_tables(index, ckpt, fold=1, opts=opts, progress=False)[0]
    from_model = export_oof_tables(index, load_checkpoint(ckpt)[0], fold=1, opts=opts, progress=False)[0]
    pd.testing.assert_frame_equal(from_file, from_model)
