"""Datasets over the RGBY cache written by :mod:`hpa_kernel.train.prepare`.

An index CSV has ``ID,Label,path`` (+ ``fold``); ``path`` points to a ``.npy`` uint8
(or uint16) ``(S, S, 4)`` array, relative to the index's folder unless absolute.
Samples are resized to the model's ``image_size`` with ``cv2.INTER_AREA`` (as the
kernel does), augmented, scaled to [0, 1] by dtype and normalised with ``mean/std``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hpa_kernel.train.folds import label_matrix

__all__ = ["load_index", "load_cells", "resolve_paths", "to_tensor", "RGBYDataset", "CellCropDataset"]


def load_index(path: str | Path) -> pd.DataFrame:
    """Read an index CSV and make its ``path`` column absolute."""
    path = Path(path)
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


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(H, W, 4)`` uint8/uint16/float32 image -> normalised float ``(4, H, W)`` tensor."""
    if image.dtype == np.uint8:
        x = image.astype(np.float32) * (1.0 / 255.0)
    elif image.dtype == np.uint16:
        x = image.astype(np.float32) * (1.0 / 65535.0)
    else:
        x = image.astype(np.float32, copy=False)
    from hpa_kernel.stages.model import normalize

    x = normalize(x, mean, std)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class RGBYDataset(Dataset):
    """``(image tensor (4,S,S), target (19,) float)`` for each row of an index frame.

    With ``patch`` set, a random ``patch x patch`` square of the ``image_size`` image is
    returned instead (same pixel scale as inference, a quarter of the compute for
    ``patch = image_size / 2``); the image's labels stay the target.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
        patch: int | None = None,
    ) -> None:
        self.paths = list(frame["path"].astype(str))
        self.targets = label_matrix(frame).astype(np.float32)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        if patch is not None and not 0 < patch <= image_size:
            raise ValueError(f"patch {patch} must be in 1..image_size ({image_size})")
        self.patch = patch if patch and patch < image_size else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """The cached image ``i`` at ``image_size`` (uint8/uint16, not augmented)."""
        img = np.load(self.paths[i])
        if img.ndim != 3 or img.shape[2] != 4:
            raise ValueError(f"{self.paths[i]}: expected (S,S,4), got {img.shape}")
        if img.shape[0] != self.image_size or img.shape[1] != self.image_size:
            interp = cv2.INTER_AREA if img.shape[0] > self.image_size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.image_size, self.image_size), interpolation=interp)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.load(i)
        if self.patch is not None:
            y0, x0 = np.random.randint(0, self.image_size - self.patch + 1, size=2)
            img = np.ascontiguousarray(img[y0 : y0 + self.patch, x0 : x0 + self.patch])
        if self.augment is not None:
            img = self.augment(img)
        return to_tensor(img, self.mean, self.std), torch.from_numpy(self.targets[i])


class CellCropDataset(Dataset):
    """Single-cell crops exactly as Step 2 makes them (:func:`hpa_kernel.step2.crop_cells`).

    Rows of a cell table (``ID,cell_id,Label,path,mask``): the cached image and its label
    image (same size, the 512 image of the kernel). Returns
    ``(crop tensor (4, crop_size, crop_size), target (19,))`` with the cell's labels.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.paths = list(frame["path"].astype(str))
        self.masks = list(frame["mask"].astype(str))
        self.cell_ids = frame["cell_id"].astype(int).to_numpy()
        self.targets = label_matrix(frame).astype(np.float32)
        self.crop_size = int(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def crop(self, i: int) -> np.ndarray:
        """The cell's crop ``(crop, crop, 4)`` float32 in [0, 1] (not augmented)."""
        from hpa_kernel.formats.images import resize_rgby
        from hpa_kernel.stages.step2 import crop_cells

        img = np.load(self.paths[i])
        labels = np.load(self.masks[i])
        out = crop_cells(resize_rgby(img, img.shape[0]), labels, np.array([self.cell_ids[i]]), self.crop_size)
        return np.ascontiguousarray(out[0].transpose(1, 2, 0))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.crop(i)
        if self.augment is not None:
            img = self.augment(img)
        return to_tensor(img, self.mean, self.std), torch.from_numpy(self.targets[i])
