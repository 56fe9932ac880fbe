"""Cell tables for Step-2-like training crops: from truth and from the segmenter."""

import numpy as np
import pandas as pd
import pytest


from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.cells import build_cell_table, main
from hpa_kernel.train.dataset import CellCropDataset, load_cells
from hpa_kernel.train.prepare import prepare_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cells")
    write_dataset(tmp_path / "data", 4, seed=1006, sizes=256, depth=8, split="train", progress=False)
    s = prepare_cache(tmp_path / "data" / "train.csv", [tmp_path / "data" / "train"], tmp_path / "cache",
                      size=128, workers=1, n_folds=2, progress=False)
    return tmp_path, s.index_path


def test_truth_cells_carry_per_cell_labels(cache):
    root, index = cache
    t = build_cell_table(index, truth=root / "data" / "truth", max_per_image=50, min_area=1, progress=False)
    truth = pd.read_csv(root / "data" / "truth" / "cells.csv")
    merged = t.merge(truth, on=["ID", "cell_id"], suffixes=("", "_truth"))
    assert len(merged) == len(t) > 0 and (merged["Label"] == merged["Label_truth"]).all()
    for iid, mask in zip(t["ID"], t["mask"]):
        m = np.load(index.parent / mask)
        assert m.shape == (128, 128) and m.dtype == np.int32
    crops = CellCropDataset(load_cells(index.parent / "cells.csv"), 64, (0.5,) * 4, (0.25,) * 4)
    x, y = crops[0]
    assert x.shape == (4, 64, 64) and y.sum() >= 1


def test_segmented_cells_get_the_image_labels(cache):
    from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

    root, index = cache
    t = build_cell_table(index, segmenter=Segmenter(), max_per_image=5, min_area=4, progress=False)
    labels = pd.read_csv(index).set_index("ID")["Label"]
    assert len(t) > 0 and t.groupby("ID").size().max() <= 5
    assert (t["Label"].to_numpy() == labels.loc[t["ID"]].to_numpy()).all()
    assert set(t["fold"]) <= {0, 1}


def test_exactly_one_source(cache):
    root, index = cache
    with pytest.raises(ValueError, match="exactly one"):
        build_cell_table(index, progress=False)
    assert main(["--index", str(index), "--truth", str(root / "data" / "truth")]) == 0
