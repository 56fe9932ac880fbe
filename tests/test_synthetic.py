"""Synthetic HPA-like images: truth consistency, class patterns, the dataset writer, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from hpa_kernel.classes import NEGATIVE, parse_labels
from hpa_kernel.tools.synthetic import (
    SyntheticImage,
    image_id,
    main,
    make_image,
    sample_dataset,
    write_dataset,
)

GREEN = 1


def _img(seed: int, h: int = 256, w: int = 256, **kw) -> SyntheticImage:
    return make_image(np.random.default_rng(seed), h, w, **kw)


def _border_ids(lab: np.ndarray) -> set[int]:
    edge = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    return set(np.unique(edge[edge > 0]).tolist())


def _bg(g: np.ndarray, lab: np.ndarray) -> float:
    """Median green of the background far (> 4 px) from every cell."""
    far = ndimage.binary_erosion(lab == 0, iterations=4)
    return float(np.median(g[far]))


def _local_bg(g: np.ndarray, lab: np.ndarray, k: int) -> float:
    """Median green of the background 4-20 px around cell ``k`` (illumination is uneven)."""
    ring = ndimage.binary_dilation(lab == k, iterations=20) & ndimage.binary_erosion(lab == 0, iterations=4)
    return float(np.median(g[ring])) if ring.sum() > 50 else _bg(g, lab)


# ------------------------------------------------------------------ determinism


def test_same_seed_identical_different_seed_different() -> None:
    a, b, c = _img(7), _img(7), _img(8)
    assert np.array_equal(a.rgby, b.rgby)
    assert np.array_equal(a.cell_labels, b.cell_labels)
    assert np.array_equal(a.nuclei_labels, b.nuclei_labels)
    assert a.cell_classes == b.cell_classes and a.image_labels == b.image_labels
    assert not np.array_equal(a.rgby, c.rgby)
    assert not np.array_equal(a.cell_labels, c.cell_labels)


# ------------------------------------------------------------------ shapes and truth


@pytest.mark.parametrize("h,w,depth", [(256, 256, 8), (192, 320, 16), (320, 192, 8)])
def test_shapes_and_dtypes(h: int, w: int, depth: int) -> None:
    im = _img(3, h, w, depth=depth)
    assert im.rgby.shape == (h, w, 4)
    assert im.rgby.dtype == (np.uint8 if depth == 8 else np.uint16)
    assert im.cell_labels.shape == im.nuclei_labels.shape == (h, w)
    assert im.cell_labels.dtype == im.nuclei_labels.dtype == np.int32
    assert (im.height, im.width) == (h, w)
    if depth == 16:
        assert im.rgby.max() > 255  # really uses the 16-bit range


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_labels_consecutive_and_consistent(seed: int) -> None:
    im = _img(seed, 320, 288)
    lab, nuc = im.cell_labels, im.nuclei_labels
    n = len(im.cell_classes)
    assert n >= 3
    assert np.array_equal(np.unique(lab), np.arange(n + 1))
    assert sorted(im.cell_classes) == list(range(1, n + 1))
    assert np.array_equal(im.cell_ids, np.arange(1, n + 1))
    # each nucleus lies in its own cell, every cell has a visible nucleus
    assert np.all(lab[nuc > 0] == nuc[nuc > 0])
    assert np.array_equal(np.unique(nuc), np.arange(n + 1))
    # nuclei are smaller than their cells
    assert (nuc > 0).sum() < 0.7 * (lab > 0).sum()
    # classes are valid and the image labels are their union
    for cls in im.cell_classes.values():
        assert cls == sorted(set(cls)) and cls
        assert all(0 <= c <= NEGATIVE for c in cls)
        assert NEGATIVE not in cls or cls == [NEGATIVE]
    assert im.image_labels == sorted({c for v in im.cell_classes.values() for c in v})


def test_each_cell_is_one_piece() -> None:
    im = _img(11, 384, 384)
    for k, sl in enumerate(ndimage.find_objects(im.cell_labels), start=1):
        _, n = ndimage.label(im.cell_labels[sl] == k)
        assert n == 1, f"cell {k} has {n} pieces"


def test_cells_touch_border_and_each_other() -> None:
    touching_border = touching_cells = 0
    for seed in range(4):
        lab = _img(seed, 256, 256).cell_labels
        touching_border += len(_border_ids(lab))
        a, b = lab[:, :-1], lab[:, 1:]
        touching_cells += int(np.sum((a > 0) & (b > 0) & (a != b)))
        assert (lab == 0).mean() > 0.02  # some background between cells
    assert touching_border >= 4
    assert touching_cells > 0


def test_cell_size_scales_with_image_size() -> None:
    """Same field of view: a 4x larger image has about 4x larger cells, not more cells."""
    small = [_img(s, 256, 256) for s in range(3)]
    large = [_img(s, 1024, 1024) for s in range(3)]

    def mean_diameter(ims: list[SyntheticImage]) -> float:
        areas = np.concatenate([np.bincount(i.cell_labels.ravel())[1:] for i in ims])
        return float(np.sqrt(np.median(areas)))

    ratio = mean_diameter(large) / mean_diameter(small)
    assert 3.0 < ratio < 5.3
    # same seed -> about the same cells (only border fragments may differ)
    for s, l in zip(small, large):
        assert abs(len(s.cell_classes) - len(l.cell_classes)) <= 2


def test_reference_scale_cell_count_and_diameter() -> None:
    """At 2048 px: 10-40 cells inside the image, diameters of roughly 200-400 px."""
    im = _img(5, 2048, 2048)
    assert 10 <= len(im.cell_classes) <= 55
    areas = np.bincount(im.cell_labels.ravel())[1:]
    inner = np.array(sorted(set(range(1, len(areas) + 1)) - _border_ids(im.cell_labels))) - 1
    diam = 2 * np.sqrt(areas[inner] / np.pi)
    assert 180 < np.median(diam) < 450


def test_n_cells() -> None:
    im = _img(4, 512, 512, n_cells=5)
    assert 5 <= len(im.cell_classes) <= 9


def test_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        make_image(rng, 256, 256, depth=12)
    with pytest.raises(ValueError):
        make_image(rng, 256, 256, image_labels=[19])


# ------------------------------------------------------------------ single-cell classes


def test_negative_image_has_no_green() -> None:
    im = _img(6, 384, 384, image_labels=[NEGATIVE])
    assert im.image_labels == [NEGATIVE]
    assert all(v == [NEGATIVE] for v in im.cell_classes.values())
    g = im.rgby[..., GREEN].astype(float)
    for k in im.cell_classes:
        core = ndimage.binary_erosion(im.cell_labels == k, iterations=2)
        if core.sum() > 20:
            assert abs(g[core].mean() - _local_bg(g, im.cell_labels, k)) < 3


def test_cells_vary_within_an_image() -> None:
    """Cells show the whole image pattern (at least one per image), a subset, or nothing."""
    kinds = set()
    full = total = 0
    for seed in range(6):
        im = _img(seed, 512, 512, image_labels=[0, 16], n_cells=20)
        assert im.image_labels[:2] == [0, 16]
        n_full = sum(v == [0, 16] for v in im.cell_classes.values())
        assert n_full >= 1
        full, total = full + n_full, total + len(im.cell_classes)
        kinds |= {tuple(v) for v in im.cell_classes.values()}
    assert 0.3 <= full / total <= 0.9
    assert (0, 16) in kinds and (NEGATIVE,) in kinds and ({(0,), (16,)} & kinds)


def test_a_realistic_share_of_cells_differ_from_their_image() -> None:
    """Per-cell labelling must matter: over random images, a third or more of the cells do
    not carry exactly their image's positive classes, and in some images a class shows in
    only part of the cells that have green (not just green vs. Negative cells)."""
    cells = differ = partial_images = 0
    for seed in range(40):
        im = _img(seed, 192, 192)
        pos = set(im.image_labels) - {NEGATIVE}
        for cls in im.cell_classes.values():
            cells += 1
            differ += (set(cls) - {NEGATIVE}) != pos
        green = [set(v) for v in im.cell_classes.values() if v != [NEGATIVE]]
        partial_images += any(c not in v for v in green for c in pos - {11})
    assert 0.3 <= differ / cells <= 0.6
    assert partial_images >= 8


def test_variable_class_keeps_the_requested_image_labels() -> None:
    for seed in range(8):
        im = _img(seed, 256, 256, image_labels=[0, 16], n_cells=12)
        assert {0, 16} <= set(im.image_labels)


def test_negative_requested_with_pattern_gives_a_negative_cell() -> None:
    for seed in range(3):
        im = _img(seed, 384, 384, image_labels=[7, NEGATIVE], n_cells=4)
        assert im.image_labels == [7, NEGATIVE]


@pytest.mark.parametrize("cls", list(range(18)))
def test_every_class_draws_green_in_its_cells_only(cls: int) -> None:
    """Positive cells carry green signal well above background; Negative cells do not."""
    im = make_image(np.random.default_rng([cls, 42]), 512, 512, image_labels=[cls, NEGATIVE], n_cells=8)
    assert cls in im.image_labels and NEGATIVE in im.image_labels
    lab = im.cell_labels
    g = cv2.GaussianBlur(im.rgby[..., GREEN].astype(np.float32), (0, 0), 1.0)
    bg = _bg(g, lab)
    border = _border_ids(lab)
    ids = np.arange(1, lab.max() + 1)
    peak = ndimage.maximum(g, lab, ids) - bg
    pos = [k for k in ids if cls in im.cell_classes[k] and k not in border]
    neg = [k for k in ids if im.cell_classes[k] == [NEGATIVE]]
    assert pos and neg
    assert min(peak[k - 1] for k in pos) > 12, "a positive cell shows no green"
    for k in neg:
        core = ndimage.binary_erosion(lab == k, iterations=3)
        if core.sum() > 20:
            assert g[core].mean() - _local_bg(g, lab, k) < 3, f"Negative cell {k} has green"


def _compartment_means(im: SyntheticImage, cls: int) -> dict[str, float]:
    g = im.rgby[..., GREEN].astype(float)
    lab, nuc = im.cell_labels, im.nuclei_labels
    border = _border_ids(lab)
    sel = np.isin(lab, [k for k, v in im.cell_classes.items() if cls in v and k not in border])
    edge = sel & ~ndimage.binary_erosion(lab > 0, iterations=2, border_value=0)
    edge |= sel & (ndimage.grey_dilation(lab, size=3) != ndimage.grey_erosion(lab, size=3))
    inner = sel & ndimage.binary_erosion(sel, iterations=6) & ~edge
    nuc_sel = sel & (nuc > 0)
    nuc_core = nuc_sel & ndimage.binary_erosion(nuc > 0, iterations=3)
    nuc_rim = nuc_sel & ~ndimage.binary_erosion(nuc > 0, iterations=1) | (
        sel & (nuc == 0) & ndimage.binary_dilation(nuc > 0, iterations=1)
    )
    cyto = inner & (nuc == 0) & ~ndimage.binary_dilation(nuc > 0, iterations=3)
    return {
        "nucleus": g[nuc_core].mean(),
        "nuc_rim": g[nuc_rim].mean(),
        "cytoplasm": g[cyto].mean(),
        "edge": g[edge].mean(),
        "inner": g[inner & (nuc == 0)].mean(),
        "bg": _bg(g, lab),
    }


def test_nucleoplasm_is_in_the_nucleus() -> None:
    m = _compartment_means(_img(21, 512, 512, image_labels=[0]), 0)
    assert m["nucleus"] - m["bg"] > 4 * (m["cytoplasm"] - m["bg"]) and m["nucleus"] - m["bg"] > 20


def test_cytosol_is_outside_the_nucleus() -> None:
    m = _compartment_means(_img(22, 512, 512, image_labels=[16]), 16)
    assert m["cytoplasm"] - m["bg"] > 3 * (m["nucleus"] - m["bg"]) and m["cytoplasm"] - m["bg"] > 15


def test_plasma_membrane_is_on_the_cell_edge() -> None:
    m = _compartment_means(_img(23, 1024, 1024, image_labels=[13]), 13)
    assert m["edge"] - m["bg"] > 3 * (m["inner"] - m["bg"])


def test_nuclear_membrane_is_on_the_nuclear_rim() -> None:
    m = _compartment_means(_img(24, 1024, 1024, image_labels=[1]), 1)
    assert m["nuc_rim"] - m["bg"] > 3 * (m["nucleus"] - m["bg"])
    assert m["nuc_rim"] - m["bg"] > 3 * (m["cytoplasm"] - m["bg"])


def test_mitotic_spindle_only_in_dividing_cells() -> None:
    im = _img(25, 1024, 1024, image_labels=[11, 7])
    spindle = [k for k, v in im.cell_classes.items() if 11 in v]
    other = [k for k, v in im.cell_classes.items() if 11 not in v]
    assert spindle and len(spindle) < len(other)
    assert any(7 in im.cell_classes[k] for k in other)

    def elongation(k: int) -> float:
        ys, xs = np.nonzero(im.nuclei_labels == k)
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
        return float(np.sqrt(ev[1] / max(ev[0], 1e-6)))

    assert min(elongation(k) for k in spindle) > 2.2  # condensed metaphase plate
    assert np.median([elongation(k) for k in other]) < 1.6


def test_all_19_classes_can_be_drawn_together() -> None:
    im = _img(26, 512, 512, image_labels=list(range(19)), n_cells=12)
    assert set(im.image_labels) == set(range(19))


# ------------------------------------------------------------------ dataset writer


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_write_dataset_layout_and_csvs(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "d", 3, seed=5, sizes=(160, (128, 192)), depth="mixed", progress=False)
    sample = pd.read_csv(out / "sample_submission.csv", keep_default_na=False)
    assert list(sample.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert (sample["PredictionString"] == "").all()
    assert list(zip(sample.ImageHeight, sample.ImageWidth)) == [(160, 160), (128, 192), (160, 160)]
    assert sample["ID"].is_unique
    assert all(len(i) == 36 and i.count("-") == 4 for i in sample["ID"])
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns) == ["ID", "Label"] and list(train.ID) == list(sample.ID)
    cells = pd.read_csv(out / "truth" / "cells.csv")
    assert list(cells.columns) == ["ID", "cell_id", "Label"]
    for k, row in sample.iterrows():
        iid, w, h = row.ID, row.ImageWidth, row.ImageHeight
        depth = 8 if k % 2 == 0 else 16
        for ch in ("red", "green", "blue", "yellow"):
            a = cv2.imread(str(out / "test" / f"{iid}_{ch}.png"), cv2.IMREAD_UNCHANGED)
            assert a.shape == (h, w) and a.dtype == (np.uint8 if depth == 8 else np.uint16)
        lab = cv2.imread(str(out / "truth" / "labels" / f"{iid}.png"), cv2.IMREAD_UNCHANGED)
        assert lab.shape == (h, w) and lab.dtype == np.uint16
        mine = cells[cells.ID == iid]
        assert list(mine.cell_id) == list(range(1, lab.max() + 1))
        union = sorted({c for s in mine.Label for c in parse_labels(str(s))})
        assert parse_labels(train.loc[train.ID == iid, "Label"].item()) == union
        # the files are make_image's output for rng [seed, index]
        ref = make_image(np.random.default_rng([5, k]), h, w, depth=depth)
        assert np.array_equal(lab, ref.cell_labels)
        green = cv2.imread(str(out / "test" / f"{iid}_green.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(green, ref.rgby[..., 1])


def test_write_dataset_is_byte_identical_and_seed_dependent(tmp_path: Path) -> None:
    kw = dict(sizes=(96, (80, 112)), depth=(8, 16), progress=False)
    a = _digest(write_dataset(tmp_path / "a", 2, seed=1, **kw))
    b = _digest(write_dataset(tmp_path / "b", 2, seed=1, n_jobs=2, **kw))
    c = _digest(write_dataset(tmp_path / "c", 2, seed=2, **kw))
    assert a == b
    assert set(a) != set(c)  # other IDs


def test_write_dataset_train_split(tmp_path: Path) -> None:
    out = write_dataset(tmp_path, 1, seed=3, sizes=96, split="train", progress=False)
    assert len(list((out / "train").glob("*.png"))) == 4
    assert not (out / "test").exists()
    with pytest.raises(ValueError):
        write_dataset(tmp_path, 1, seed=3, split="val")


def test_image_id_is_uuid_like_and_deterministic() -> None:
    a = image_id(np.random.default_rng(1))
    assert a == image_id(np.random.default_rng(1)) != image_id(np.random.default_rng(2))
    assert [len(p) for p in a.split("-")] == [8, 4, 4, 4, 12]
    int(a.replace("-", ""), 16)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["--out", str(tmp_path), "--images", "2", "--seed", "4", "--sizes", "96,64x80", "--depth", "16"])
    assert rc == 0
    sample = pd.read_csv(tmp_path / "sample_submission.csv")
    assert list(zip(sample.ImageHeight, sample.ImageWidth)) == [(96, 96), (64, 80)]
    a = cv2.imread(str(tmp_path / "test" / f"{sample.ID[1]}_blue.png"), cv2.IMREAD_UNCHANGED)
    assert a.dtype == np.uint16 and a.shape == (64, 80)
    assert "2 images" in capsys.readouterr().out


def test_sample_dataset_generated_once(tmp_path: Path) -> None:
    out = sample_dataset(tmp_path / "s")
    sample = pd.read_csv(out / "sample_submission.csv")
    assert len(sample) == 6
    sizes = set(zip(sample.ImageHeight, sample.ImageWidth))
    assert (768, 1024) in sizes and max(max(s) for s in sizes) <= 1024
    dtypes = {
        cv2.imread(str(out / "test" / f"{i}_red.png"), cv2.IMREAD_UNCHANGED).dtype for i in sample.ID
    }
    assert dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert sample_dataset(tmp_path / "s") == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


# ------------------------------------------------------------------ acceptance: truth scores 1.0


def _truth_submission(out: Path, path: Path, assign) -> Path:
    """A submission of every true cell (its truth mask) with classes ``assign(id, cells)``, conf 1."""
    from hpa_kernel.formats.rle import encode_label_image
    from hpa_kernel.formats.submission import prediction_string, write_submission

    sample = pd.read_csv(out / "sample_submission.csv")
    cells = pd.read_csv(out / "truth" / "cells.csv", dtype={"Label": str})
    rows = {}
    for iid, w, h in zip(sample.ID, sample.ImageWidth, sample.ImageHeight):
        lab = cv2.imread(str(out / "truth" / "labels" / f"{iid}.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
        mine = cells[cells.ID == iid]
        scores = np.zeros((len(mine), 19), np.float32)
        for i, label in enumerate(assign(iid, mine)):
            scores[i, parse_labels(label)] = 1.0
        rows[iid] = (w, h, prediction_string(encode_label_image(lab, w, h), mine.cell_id.to_numpy(), scores))
    return write_submission(rows, list(sample.ID), path)


def test_truth_as_submission_scores_map_one_and_shuffled_far_lower(tmp_path: Path) -> None:
    from hpa_kernel.tools.metric import evaluate
    from hpa_kernel.formats.submission import validate_submission

    out = write_dataset(tmp_path / "d", 6, seed=77, sizes=(256, (192, 288), 320), depth="mixed", progress=False)
    truth = out / "truth"
    perfect = _truth_submission(out, tmp_path / "perfect.csv", lambda iid, m: list(m.Label))
    assert validate_submission(perfect, out / "sample_submission.csv") == []
    for iou in ("mask", "box"):
        res = evaluate(perfect, truth, iou=iou)
        assert res.mAP == pytest.approx(1.0)
        assert len(res.per_class) >= 5  # several classes really scored

    # cells given other cells' classes: across images, and within each image (a roll)
    cells = pd.read_csv(truth / "cells.csv", dtype={"Label": str})
    perm = np.random.default_rng(0).permutation(len(cells))
    other = dict(zip(zip(cells.ID, cells.cell_id), cells.Label.to_numpy()[perm]))
    shuffled = _truth_submission(out, tmp_path / "shuffled.csv", lambda iid, m: [other[(iid, c)] for c in m.cell_id])
    assert evaluate(shuffled, truth).mAP < 0.5
    rolled = _truth_submission(out, tmp_path / "rolled.csv", lambda iid, m: list(np.roll(m.Label.to_numpy(), 1)))
    assert evaluate(rolled, truth).mAP < 0.9
