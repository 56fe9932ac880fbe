"""Cell tables: from the segmenter (image labels, several workers, uint16 masks) and from
synthetic truth (evaluation only)."""

import numpy as np
import pandas as pd
import pytest

from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.cells import SegmentOptions, build_cell_table, main
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
    for mask in t["mask"]:
        m = np.load(index.parent / mask)
        assert m.shape == (128, 128) and m.dtype == np.uint16
    crops = CellCropDataset(load_cells(index.parent / "cells.csv"), 64)
    x, y = crops[0]
    assert x.shape == (64, 64, 4) and y.sum() >= 1


def test_segmented_cells_get_the_image_labels_with_any_number_of_workers(cache):
    root, index = cache
    one = build_cell_table(index, segment=SegmentOptions(workers=1, batch_size=2), max_per_image=5, min_area=4,
                           progress=False)
    masks_one = {i: np.load(index.parent / "cells" / f"{i}.npy") for i in one["ID"].unique()}
    two = build_cell_table(index, segment=SegmentOptions(workers=2, batch_size=1), max_per_image=5, min_area=4,
                           progress=False)
    pd.testing.assert_frame_equal(one, two)
    for i, m in masks_one.items():
        again = np.load(index.parent / "cells" / f"{i}.npy")
        assert again.dtype == np.uint16 and np.array_equal(again, m)
    labels = pd.read_csv(index).set_index("ID")["Label"]
    assert len(one) > 0 and one.groupby("ID").size().max() <= 5
    assert (one["Label"].to_numpy() == labels.loc[one["ID"]].to_numpy()).all()
    assert set(one["fold"]) <= {0, 1}


def test_exactly_one_source_and_cli(cache, capsys):
    root, index = cache
    with pytest.raises(ValueError, match="exactly one"):
        build_cell_table(index, progress=False)
    assert main(["--index", str(index), "--segment", "--device", "cpu", "--workers", "1"]) == 0
    assert "cells ->" in capsys.readouterr().out
    assert main(["--index", str(root / "none.csv"), "--segment"]) == 2
    assert main(["--index", str(index), "--segment", "--nuclei", "n.pth"]) == 2
