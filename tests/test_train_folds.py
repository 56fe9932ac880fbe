import numpy as np
import pandas as pd
import pytest


from hpa_kernel.train.folds import FoldError, assign_folds, fold_table, format_fold_table, label_matrix, main


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(n):
        k = rng.integers(1, 4)
        labels.append("|".join(str(c) for c in sorted(rng.choice(19, size=k, replace=False))))
    return pd.DataFrame({"ID": [f"img{i:03d}" for i in range(n)], "Label": labels})


def test_label_matrix_one_hot():
    y = label_matrix(pd.DataFrame({"ID": ["a", "b"], "Label": ["0|5", "18"]}))
    assert y.shape == (2, 19) and y[0, [0, 5]].tolist() == [1, 1] and y[1, 18] == 1 and y.sum() == 3


def test_bad_class_names_the_row():
    df = pd.DataFrame({"ID": ["a", "b", "c"], "Label": ["0", "3|19", "2"]})
    with pytest.raises(FoldError, match=r"row 1 \(ID 'b'\).*19"):
        label_matrix(df)
    with pytest.raises(FoldError, match="row 1"):
        assign_folds(df, 2)


def test_four_stratified_folds_cover_every_image():
    df = assign_folds(_frame(80), n_folds=4, seed=0)
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3]
    counts = df["fold"].value_counts().sort_index().tolist()
    assert max(counts) - min(counts) <= 3
    # stratified: each common class is spread over the folds
    y = label_matrix(df)
    for c in np.nonzero(y.sum(0) >= 8)[0]:
        per_fold = [y[df["fold"].to_numpy() == k, c].sum() for k in range(4)]
        assert min(per_fold) >= 1, (c, per_fold)


def test_folds_are_deterministic():
    a = assign_folds(_frame(40), 4, seed=3)["fold"].tolist()
    b = assign_folds(_frame(40), 4, seed=3)["fold"].tolist()
    assert a == b


def test_too_few_images_is_a_clear_error():
    with pytest.raises(FoldError, match="cannot fill 4 folds"):
        assign_folds(_frame(3), 4)


def test_fold_table_counts():
    df = pd.DataFrame({"ID": list("abcd"), "Label": ["0", "0|1", "1", "18"], "fold": [0, 0, 1, 1]})
    t = fold_table(df)
    assert t.loc[0, 0] == 2 and t.loc[0, 1] == 1 and t.loc[1, 1] == 1 and t.loc[1, 18] == 1
    assert t.loc["total", "images"] == 4 and t.loc[0, "images"] == 2
    assert "class counts per fold" in format_fold_table(df)


def test_cli_writes_fold_column(tmp_path, capsys):
    p = tmp_path / "train.csv"
    _frame(20).to_csv(p, index=False)
    assert main(["--csv", str(p), "--n-folds", "4"]) == 0
    assert "fold" in pd.read_csv(p).columns
    assert "images" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"ID": ["x"], "Label": ["25"]}).to_csv(bad, index=False)
    assert main(["--csv", str(bad)]) == 2
