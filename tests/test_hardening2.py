"""Hardening, round 2 (issue 23): the lead's items — non-PNG content and the pixel cap,
Step 2 memory, the manifest's keys and files. One test per item, named in RELIABILITY.md."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from hpa_kernel.formats.images import ImageReadError, load_image, read_rgby


def _write_planes(folder, image_id, planes, ext=".png"):
    for name, plane in zip(("red", "green", "blue", "yellow"), planes):
        ok, data = cv2.imencode(ext, plane)
        assert ok
        (folder / f"{image_id}_{name}.png").write_bytes(data.tobytes())  # always named .png


@pytest.mark.parametrize("ext, kind", [(".jpg", "JPEG"), (".tiff", "TIFF"), (".bmp", "BMP")])
def test_non_png_content_under_a_png_name_is_never_decoded(tmp_path, ext, kind):
    """Item 1: the pixel cap is read from PNG headers, so only PNG content is decoded."""
    planes = [np.full((64, 48), 100 + k, np.uint8) for k in range(4)]
    _write_planes(tmp_path, "img", planes, ext)
    with pytest.raises(ImageReadError, match=f"not a PNG file \\({kind} data"):
        read_rgby(tmp_path, "img", max_pixels=10)
    item = load_image(tmp_path, "img", size=32, max_pixels=None)
    assert item.image is None and "not a PNG file" in item.error and "\n" not in item.error


# --------------------------------------------------------------------------- item 2: Step 2 memory


def _grid_labels(side: int, cell: int) -> np.ndarray:
    """A label image tiled with ``cell``-px square cells, numbered 1.. row by row."""
    n = side // cell
    ids = np.arange(1, n * n + 1, dtype=np.int32).reshape(n, n)
    return np.kron(ids, np.ones((cell, cell), np.int32))


def test_step2_crops_are_cut_batch_by_batch(tiny_manifest):
    """Item 2: a thousand cells never have all their crops in memory at once."""
    import tracemalloc

    from hpa_kernel.config import load_config
    from hpa_kernel.stages.predictor import Predictor, ScoreDetail

    labels = _grid_labels(512, 16)  # 1024 cells
    ids = np.unique(labels)
    image = np.random.default_rng(0).random((512, 512, 4), dtype=np.float32)
    predictor = Predictor.from_config(load_config(tiny_manifest).replace(step1_weight=0.0, step2_weight=1.0),
                                      batch_size=8)
    all_at_once = len(ids) * 4 * 32 * 32 * 4  # bytes of every 32 px crop together: 16 MiB
    tracemalloc.start()
    detail = ScoreDetail()
    predictor.score(image, labels, ids, detail=detail)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert detail.steps["m0"]["step2"].shape == (len(ids), 19)
    assert peak < all_at_once / 4, f"peak {peak:,} bytes of numpy/Python memory"


def test_the_time_budget_cuts_a_long_step2_short(tiny_manifest):
    """Item 2: past the deadline, Step 2 stops between batches and Step 1 scores the image."""
    import time

    from hpa_kernel.config import load_config
    from hpa_kernel.stages.predictor import Predictor, ScoreDetail

    labels = _grid_labels(512, 64)
    ids = np.unique(labels)
    image = np.random.default_rng(1).random((512, 512, 4), dtype=np.float32)
    predictor = Predictor.from_config(load_config(tiny_manifest), batch_size=4)
    detail = ScoreDetail()
    cut = predictor.score(image, labels, ids, detail=detail, deadline=time.perf_counter())
    assert detail.steps["m0"]["step2"] is None and predictor.step2_cut == 1
    step1_only = predictor.score(image, labels, ids, step2=False)
    np.testing.assert_array_equal(cut, step1_only)
    whole = predictor.score(image, labels, ids, deadline=time.perf_counter() + 3600)
    assert predictor.step2_cut == 1 and not np.array_equal(whole, step1_only)


def test_crop_size_is_bounded(tmp_path, tiny_checkpoint):
    """Item 2: a crop side over 1024 is refused in the manifest, the checkpoint and the stage."""
    import torch

    from hpa_kernel.config import ConfigError, MAX_CROP_SIZE, config_from_dict
    from hpa_kernel.stages import model as model_mod
    from hpa_kernel.stages.step2 import crop_cells

    assert MAX_CROP_SIZE == 1024
    with pytest.raises(ConfigError, match="crop_size"):
        config_from_dict({"crop_size": 4096}, root=tmp_path)
    obj = torch.load(tiny_checkpoint, weights_only=True)
    obj["meta"]["crop_size"] = 4096
    torch.save(obj, tmp_path / "big.pt")
    with pytest.raises(model_mod.CheckpointError, match="crop_size 4096"):
        model_mod.load_checkpoint(tmp_path / "big.pt")
    with pytest.raises(ValueError, match="crop_size"):
        crop_cells(np.zeros((8, 8, 4), np.float32), np.ones((8, 8), np.int32), np.array([1]), 4096)


# --------------------------------------------------------------------------- item 6: manifest keys


@pytest.mark.parametrize("raw, words", [
    ({"classifier": [{"path": "m.pt"}]}, "unknown key 'classifier'; did you mean 'classifiers'"),
    ({"segmentation": {"methd": "classic"}}, "segmentation: unknown key 'methd'; did you mean 'method'"),
    ({"step_weights": {"step_1": 0.5}}, "step_weights: unknown key 'step_1'"),
    ({"classifiers": [{"path": "m.pt", "wieght": 2}]}, "classifiers[0]: unknown key 'wieght'; did you mean 'weight'"),
    ({"files": {"m.pt": {"size": 1, "sha": "x"}}}, "unknown key 'sha'; did you mean 'sha256'"),
    ({"classifiers": [{"path": "a.pt", "weight": 1e308}, {"path": "b.pt", "weight": 1e308}]}, "overflows"),
])
def test_unknown_manifest_keys_and_overflowing_weights_are_refused(tmp_path, raw, words):
    """Item 6: every level's keys are checked, one line naming the key and the closest known one."""
    from hpa_kernel.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, root=tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- item 10: manifest files


@pytest.mark.parametrize("entry, words", [
    ({"size": None, "sha256": "0" * 64}, "files['m.pt'].size must be an integer, not None"),
    ({"size": "big"}, "files['m.pt'].size must be an integer, not 'big'"),
    ({"size": 3, "sha256": 12}, "files['m.pt'].sha256 must be a string"),
])
def test_bad_files_entries_name_the_manifest_and_the_field(tmp_path, entry, words):
    import json

    from hpa_kernel.config import ConfigError, load_config

    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"classifiers": [{"path": "m.pt"}], "files": {"m.pt": entry}}))
    with pytest.raises(ConfigError) as info:
        load_config(m)
    assert str(m) in str(info.value) and words in str(info.value)


def test_manifests_and_weights_that_are_not_regular_files(tmp_path):
    """Item 10: a FIFO or /dev/zero as --weights, a classifier path that is a symlink loop:
    one line each (exit 2 from submit), nothing read or blocked."""
    import json
    import os
    import subprocess
    import sys

    from hpa_kernel.config import ConfigError, load_config

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")
    (tmp_path / "loop.pt").symlink_to(tmp_path / "loop.pt")
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"classifiers": [{"path": "loop.pt"}]}))
    with pytest.raises(ConfigError, match="classifiers\\[0\\].path.*cannot be resolved"):
        load_config(m)
    for weights in (fifo, m):
        r = subprocess.run([sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(tmp_path / "none"),
                            "--weights", str(weights), "--out", str(tmp_path / "s.csv")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.integrity", "--manifest", str(m), "--update"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "cannot be resolved" in r.stderr + r.stdout


def test_integrity_update_keeps_the_manifest_mode(tmp_path, tiny_checkpoint):
    """Item 13: `integrity --update` (and every manifest write: config.write_manifest) keeps the file's mode."""
    import json
    import os
    import shutil
    import stat as st

    from hpa_kernel.integrity import update_manifest

    shutil.copy(tiny_checkpoint, tmp_path / "m.pt")
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"classifiers": [{"path": "m.pt"}]}))
    for mode in (0o600, 0o664):
        os.chmod(m, mode)
        update_manifest(m)
        assert st.S_IMODE(m.stat().st_mode) == mode
        assert "m.pt" in json.loads(m.read_text())["files"]
