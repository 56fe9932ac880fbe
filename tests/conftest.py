import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~20 s (still run in CI)")

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained, tiny Puzzle-CAM checkpoint (64 px full image, 32 px crops)."""
    import torch

    from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint

    torch.manual_seed(0)
    model = PuzzleCAM("resnet10t", pretrained=False).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(model, path, image_size=64, crop_size=32)
    return path


def write_manifest(folder: Path, checkpoint: Path, **extra) -> Path:
    """A manifest in ``folder`` naming ``checkpoint`` (copied beside it)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, folder / "model.pt")
    raw = {
        "segmentation": {"method": "classic"},
        "classifiers": [{"path": "model.pt", "weight": 1.0}],
        "crop_size": 32,
        "batch_size": 8,
    }
    raw.update(extra)
    path = folder / "manifest.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory, tiny_checkpoint) -> Path:
    return write_manifest(tmp_path_factory.mktemp("weights"), tiny_checkpoint)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A Kaggle-layout folder of 4 small synthetic images (8- and 16-bit, one non-square)."""
    from hpa_kernel.tools.synthetic import write_dataset

    out = tmp_path_factory.mktemp("data")
    write_dataset(out, images=4, seed=9100, sizes=(512, (384, 512), 640), depth="mixed", split="test")
    return out
