"""Datasets over the RGBY cache written by :mod:`hpa_kernel.train.prepare`.

An index CSV has ``ID,Label,path`` (+ ``fold``); ``path`` points to a ``.npy`` uint8
(or uint16) ``(S, S, 4)`` array, relative to the index's folder unless absolute.

Samples leave the worker as **channels-last, undecoded pixels**: a ``uint8``
``(H, W, 4)`` tensor for the uint8 cache (a quarter of the bytes of float32), float32 in
[0, 1] for anything else. Scaling and normalisation happen on the device
(:func:`to_model_input`), after the copy.

A sample that cannot be read or augmented is returned as a :class:`Skipped` marker
instead of raising; :func:`collate_skipping` drops those from the batch and hands them
to the trainer, which counts them and reports them at the end of the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate

from hpa_kernel.train.folds import label_matrix

__all__ = [
    "Skipped",
    "load_index",
    "load_cells",
    "resolve_paths",
    "random_crop",
    "collate_skipping",
    "to_model_input",
    "RGBYDataset",
    "CellCropDataset",
]


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be produced: its file and the reason (one line)."""

    path: str
    reason: str


def load_index(path: str | Path) -> pd.DataFrame:
    """Read an index CSV and make its ``path`` column absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path} not found")
    df = pd.read_csv(path)
    missing = {"ID", "Label", "path"} - set(df.columns)
    if missing:
        raise ValueError(f"index {path} lacks column(s) {sorted(missing)}")
    df["path"] = resolve_paths(df["path"], path.parent)
    return df


def load_cells(path: str | Path) -> pd.DataFrame:
    """Read a ``cells.csv`` (:mod:`hpa_kernel.train.cells`) and make ``path``/``mask`` absolute."""
    path = Path(path)
    df = pd.read_csv(path)
    missing = {"ID", "cell_id", "Label", "path", "mask"} - set(df.columns)
    if missing:
        raise ValueError(f"cell table {path} lacks column(s) {sorted(missing)}")
    df["path"] = resolve_paths(df["path"], path.parent)
    df["mask"] = resolve_paths(df["mask"], path.parent)
    return df


def resolve_paths(paths: Sequence[str], root: Path) -> list[str]:
    return [str(p if Path(p).is_absolute() else (root / p)) for p in map(str, paths)]


def random_crop(image: np.ndarray, side: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A uniformly placed ``side x side`` window of an ``(H, W, C)`` image (contiguous copy).

    ``rng`` defaults to numpy's global generator (seeded per DataLoader worker).
    """
    h, w = image.shape[:2]
    if side > h or side > w:
        raise ValueError(f"crop {side} larger than the image {h}x{w}")
    draw = rng.integers if rng is not None else np.random.randint
    y0, x0 = int(draw(0, h - side + 1)), int(draw(0, w - side + 1))
    return np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])


def _pixels(image: np.ndarray) -> torch.Tensor:
    """Channels-last uint8 as is; uint16 / float as float32 in [0, 1]."""
    if image.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(image))
    if image.dtype == np.uint16:
        return torch.from_numpy(image.astype(np.float32) * (1.0 / 65535.0))
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


def to_model_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A batch from the loader ``(B, H, W, C)`` (uint8 or float in [0, 1]) -> normalised
    float32 ``(B, C, H, W)``, computed wherever ``x`` is (the GPU, after the copy)."""
    from hpa_kernel.stages.model import normalize

    x = x.permute(0, 3, 1, 2)
    x = x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
    return normalize(x.contiguous(), mean, std)


def collate_skipping(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Skipped]]:
    """``default_collate`` of the good samples, plus the :class:`Skipped` ones.

    Returns ``(x, y, skipped)``; ``x`` and ``y`` are None when every sample was skipped.
    """
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if not good:
        return None, None, skipped
    x, y = default_collate(good)
    return x, y, skipped


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class RGBYDataset(Dataset):
    """``(pixels (S, S, 4), target (19,) float)`` for each row of an index frame.

    The cached image is resized to ``image_size`` (``INTER_AREA`` down, as the kernel
    does; a no-op for a cache at that size); with ``crop`` set a uniformly placed
    ``crop x crop`` window is cut (the recipe: 384 of 512, every training sample), then
    ``augment`` runs. The image's labels are the target. A failure returns
    :class:`Skipped`.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        image_size: int,
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
        crop: int | None = None,
    ) -> None:
        self.paths = list(frame["path"].astype(str))
        self.targets = label_matrix(frame).astype(np.float32)
        self.image_size = int(image_size)
        self.augment = augment
        if crop is not None and not 0 < crop <= image_size:
            raise ValueError(f"crop {crop} must be in 1..image_size ({image_size})")
        self.crop = crop if crop and crop < image_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """The cached image ``i`` at ``image_size`` (uint8/uint16, not augmented)."""
        img = np.load(self.paths[i])
        if img.ndim != 3 or img.shape[2] != 4:
            raise ValueError(f"expected an (S, S, 4) array, got {img.shape}")
        if img.shape[0] != self.image_size or img.shape[1] != self.image_size:
            interp = cv2.INTER_AREA if img.shape[0] > self.image_size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=interp)
        return img

    def __getitem__(self, i: int):
        try:
            img = self.load(i)
            if self.crop is not None:
                img = random_crop(img, self.crop)
            if self.augment is not None:
                img = self.augment(img)
            return _pixels(img), torch.from_numpy(self.targets[i])
        except Exception as e:  # noqa: BLE001 - one bad file must not end a multi-day run
            return Skipped(self.paths[i], _one_line(e))


class CellCropDataset(Dataset):
    """Single-cell crops exactly as Step 2 makes them (:func:`hpa_kernel.stages.step2.crop_cells`),
    for **evaluation** (the trainer's per-cell validation metrics; never a training set).

    Rows of a cell table (``ID,cell_id,Label,path,mask``): the cached image and its label
    image (same size). Returns ``(pixels (crop, crop, 4) float32 in [0, 1], target (19,))``.
    """

    def __init__(self, frame: pd.DataFrame, crop_size: int) -> None:
        self.paths = list(frame["path"].astype(str))
        self.masks = list(frame["mask"].astype(str))
        self.cell_ids = frame["cell_id"].astype(int).to_numpy()
        self.targets = label_matrix(frame).astype(np.float32)
        self.crop_size = int(crop_size)

    def __len__(self) -> int:
        return len(self.paths)

    def crop(self, i: int) -> np.ndarray:
        """The cell's crop ``(crop, crop, 4)`` float32 in [0, 1]."""
        from hpa_kernel.formats.images import resize_rgby
        from hpa_kernel.stages.step2 import crop_cells

        img = np.load(self.paths[i])
        labels = np.load(self.masks[i])
        out = crop_cells(resize_rgby(img, img.shape[0]), labels, np.array([self.cell_ids[i]]), self.crop_size)
        return np.ascontiguousarray(out[0].transpose(1, 2, 0))

    def __getitem__(self, i: int):
        try:
            return _pixels(self.crop(i)), torch.from_numpy(self.targets[i])
        except Exception as e:  # noqa: BLE001
            return Skipped(f"{self.paths[i]} cell {self.cell_ids[i]}", _one_line(e))
