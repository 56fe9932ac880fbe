import shutil

import numpy as np
import pandas as pd
import pytest


from hpa_kernel.tools.synthetic import write_dataset
from hpa_kernel.train.folds import FoldError
from hpa_kernel.train.prepare import main, prepare_cache


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """8 tiny synthetic images (8- and 16-bit) split over two source folders."""
    root = tmp_path_factory.mktemp("prep")
    write_dataset(root / "a", 8, seed=1001, sizes=(96, 80), depth="mixed", split="train", progress=False)
    df = pd.read_csv(root / "a" / "train.csv")
    (root / "b").mkdir()
    for iid in df["ID"][6:]:
        for ch in ("red", "green", "blue", "yellow"):
            shutil.move(root / "a" / "train" / f"{iid}_{ch}.png", root / "b" / f"{iid}_{ch}.png")
    return root, df


def test_prepare_merges_sources_and_skips_bad_rows(two_sources, tmp_path):
    root, df = two_sources
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    for ch in ("red", "green", "blue", "yellow"):
        (bad / f"broken_{ch}.png").write_bytes(b"not a png")
    rows = pd.concat(
        [df, pd.DataFrame({"ID": ["missing", "broken"], "Label": ["0", "1"]})], ignore_index=True
    )
    csv = tmp_path / "train.csv"
    rows.to_csv(csv, index=False)
    s = prepare_cache(csv, [root / "a" / "train", root / "b", bad], tmp_path / "cache", size=64, workers=1,
                      n_folds=2, progress=False)
    assert s.written == 8 and s.reused == 0
    assert sorted(i for i, _ in s.skipped) == ["broken", "missing"]
    index = pd.read_csv(s.index_path)
    assert list(index.columns) == ["ID", "Label", "path", "width", "height", "fold"]
    assert set(zip(index["width"], index["height"])) == {(96, 96), (80, 80)}
    assert index["ID"].tolist() == df["ID"].tolist()
    assert set(index["fold"]) == {0, 1}
    for p in index["path"]:
        a = np.load(tmp_path / "cache" / p)
        assert a.shape == (64, 64, 4) and a.dtype == np.uint8 and a.max() > 0
    # a second run reuses the cache
    s2 = prepare_cache(csv, [root / "a" / "train", root / "b", bad], tmp_path / "cache", size=64, workers=1,
                       n_folds=0, progress=False)
    index2 = pd.read_csv(s2.index_path)
    assert s2.reused == 8 and s2.written == 0 and "fold" not in index2.columns
    assert index2["width"].tolist() == index["width"].tolist()  # sizes kept from the first run


def test_prepare_matches_the_kernel_resize(two_sources, tmp_path):
    from hpa_kernel.formats.images import read_rgby, resize_rgby

    root, df = two_sources
    csv = tmp_path / "one.csv"
    df.iloc[:2].to_csv(csv, index=False)  # one 8-bit and one 16-bit image
    s = prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=32, workers=1, n_folds=0, progress=False)
    for iid in df["ID"][:2]:
        want = resize_rgby(read_rgby(root / "a" / "train", iid), 32)
        got = np.load(tmp_path / "c" / "images" / f"{iid}.npy").astype(np.float32) / 255
        assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6
    assert s.written == 2


def test_prepare_bad_label_names_the_row(two_sources, tmp_path):
    root, df = two_sources
    csv = tmp_path / "bad.csv"
    bad = df.copy()
    bad.loc[3, "Label"] = "2|20"
    bad.to_csv(csv, index=False)
    with pytest.raises(FoldError, match=f"row 3 \\(ID '{bad.loc[3, 'ID']}'\\)"):
        prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=32, workers=1, progress=False)
    assert main(["--csv", str(csv), "--src", str(root / "a" / "train"), "--out", str(tmp_path / "c")]) == 2


def test_prepare_cli_parallel(two_sources, tmp_path, capsys):
    root, df = two_sources
    code = main(["--csv", str(root / "a" / "train.csv"), "--src", str(root / "a" / "train"), "--src",
                 str(root / "b"), "--out", str(tmp_path / "cache"), "--size", "32", "--workers", "2",
                 "--folds", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "8 image(s) cached" in out and "class counts per fold" in out
    assert len(pd.read_csv(tmp_path / "cache" / "index.csv")) == 8


def test_wrong_src_folder_is_refused_before_any_work(two_sources, tmp_path, caplog):
    from hpa_kernel.train.prepare import PrepareError

    root, df = two_sources
    csv = root / "a" / "train.csv"
    with pytest.raises(PrepareError, match=r"--src .*nowhere: not a folder"):
        prepare_cache(csv, [tmp_path / "nowhere"], tmp_path / "c", size=32, workers=1, progress=False)
    with pytest.raises(PrepareError, match=r"none of the 8 CSV rows has its PNGs in --src .*b"):
        prepare_cache(csv, [root / "b" / ".." / "a"], tmp_path / "c", size=32, workers=1, progress=False)
    assert not (tmp_path / "c" / "images").exists()  # nothing was written
    assert main(["--csv", str(csv), "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert main(["--csv", str(tmp_path / "none.csv"), "--src", str(root / "b"), "--out", str(tmp_path / "c")]) == 2


def test_a_cache_of_another_size_is_refused(two_sources, tmp_path):
    from hpa_kernel.train.prepare import PrepareError

    root, df = two_sources
    csv = tmp_path / "two.csv"
    df.iloc[:2].to_csv(csv, index=False)
    prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=64, workers=1, n_folds=0, progress=False)
    with pytest.raises(PrepareError, match=r"holds a 64 px cache; --size 32 needs another --out"):
        prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=32, workers=1, n_folds=0, progress=False)
    (tmp_path / "c" / "cache.json").unlink()  # an older cache without the record: the arrays tell
    with pytest.raises(PrepareError, match=r"holds a 64 px cache"):
        prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=32, workers=1, n_folds=0, progress=False)
    s = prepare_cache(csv, [root / "a" / "train"], tmp_path / "c", size=32, workers=1, n_folds=0, overwrite=True,
                      progress=False)
    assert s.written == 2 and np.load(tmp_path / "c" / "images" / f"{df['ID'][0]}.npy").shape == (32, 32, 4)


def test_folds_need_iterative_stratification_before_caching(two_sources, tmp_path, monkeypatch):
    import sys

    from hpa_kernel.train.prepare import PrepareError

    root, df = two_sources
    monkeypatch.setitem(sys.modules, "iterstrat", None)  # as if the package were not installed
    with pytest.raises(PrepareError, match="pip install iterative-stratification"):
        prepare_cache(root / "a" / "train.csv", [root / "a" / "train"], tmp_path / "c", size=32, workers=1,
                      n_folds=4, progress=False)
    assert not (tmp_path / "c").exists()
    s = prepare_cache(root / "a" / "train.csv", [root / "a" / "train"], tmp_path / "c", size=32, workers=1,
                      n_folds=0, progress=False)  # no folds asked: no need for it
    assert s.written == 6


# ------------------------------------------------------------------ issue 23 item 15


def _cli(root, csv, out, *extra):
    return main(["--csv", str(csv), "--src", str(root / "a" / "train"), "--src", str(root / "b"), "--out", str(out),
                 "--size", "64", "--workers", "1", "--folds", "0", *extra])


def test_an_unsafe_id_is_skipped_and_nothing_outside_the_cache_is_indexed(two_sources, tmp_path, caplog):
    """``../../../x`` whose ``.npy`` exists outside the cache was indexed as a reused image."""
    root, df = two_sources
    out = tmp_path / "deep" / "er" / "cache"
    outside = out / "images" / ".." / ".." / ".." / "x.npy"
    outside.parent.mkdir(parents=True, exist_ok=True)
    np.save(outside, np.zeros((64, 64, 4), np.uint8))
    csv = tmp_path / "train.csv"
    pd.concat([df, pd.DataFrame({"ID": ["../../../x", "/abs/y"], "Label": ["0", "1"]})]).to_csv(csv, index=False)
    assert _cli(root, csv, out) == 0
    index = pd.read_csv(out / "index.csv")
    assert sorted(index["ID"]) == sorted(df["ID"]) and index["path"].str.startswith("images/").all()
    assert "ID '../../../x' is not a safe file name" in caplog.text and "ID '/abs/y'" in caplog.text
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.npy" for i in df["ID"])


def test_duplicate_ids_with_different_labels_are_refused(two_sources, tmp_path, caplog):
    root, df = two_sources
    csv = tmp_path / "train.csv"
    first = df["ID"][0]
    pd.concat([df, pd.DataFrame({"ID": [first], "Label": ["18"]})]).to_csv(csv, index=False)
    assert _cli(root, csv, tmp_path / "c") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"ID '{first}' is listed with different labels" in errors[0]
    assert f"lines 2, {len(df) + 2}" in errors[0] and not (tmp_path / "c").exists()


def test_duplicate_rows_of_one_image_land_in_one_fold(two_sources, tmp_path, caplog):
    root, df = two_sources
    csv = tmp_path / "train.csv"
    pd.concat([df, df.iloc[:2]]).to_csv(csv, index=False)
    s = prepare_cache(csv, [root / "a" / "train", root / "b"], tmp_path / "c", size=64, workers=1, n_folds=2,
                      progress=False)
    index = pd.read_csv(s.index_path)
    assert len(index) == len(df) and not index["ID"].duplicated().any()
    assert "2 duplicate row(s) of the same ID and label, first kept" in caplog.text


def test_an_empty_label_names_its_own_row(two_sources, tmp_path, caplog):
    """It used to blame the first row (``Label '0.0'``): pandas read the column as floats."""
    root, df = two_sources
    rows = pd.DataFrame({"ID": list(df["ID"][:4]), "Label": ["0", "1", "", "2"]})
    csv = tmp_path / "train.csv"
    rows.to_csv(csv, index=False)
    assert _cli(root, csv, tmp_path / "c") == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"row 2 (line 4, ID '{df['ID'][2]}'): empty Label" in errors[0]
    assert "0.0" not in errors[0]


def test_max_pixels_caps_what_prepare_decodes(two_sources, tmp_path, caplog):
    """As submit's --max-pixels: over the cap, the header is read and the image skipped, never decoded."""
    root, df = two_sources
    csv = tmp_path / "train.csv"
    df.to_csv(csv, index=False)
    assert _cli(root, csv, tmp_path / "c", "--max-pixels", "8000") == 0  # 96x96 = 9216 > 8000 >= 80x80
    index = pd.read_csv(tmp_path / "c" / "index.csv")
    assert set(index["width"]) == {80} and 0 < len(index) < len(df)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(skipped) == len(df) - len(index) and all("96x96" in m and "cap of 8,000" in m for m in skipped), skipped
