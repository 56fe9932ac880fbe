"""Class-balancing sampling weights and samplers (single process and distributed).

Each class gets the inverse of its frequency; an image's weight combines the weights
of its labels (``max`` by default, or ``mean``). Class weights are clipped at the value
of class 8 (Intermediate filaments) so the rarest classes (11 Mitotic spindle,
15 Aggresome) are not drawn wildly often.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

__all__ = ["class_weights", "image_weights", "make_sampler", "DistributedWeightedSampler"]

logger = logging.getLogger(__name__)


def class_weights(y: np.ndarray, clip_class: int | None = 8) -> np.ndarray:
    """Inverse class frequencies ``N / count_c`` of a one-hot ``(N, C)`` matrix.

    Absent classes get 0. With ``clip_class`` every weight is capped at that class's
    weight; if that class is absent from ``y`` no clipping is done (and a warning says so).
    """
    y = np.asarray(y, dtype=np.float64)
    counts = y.sum(0)
    w = np.where(counts > 0, len(y) / np.maximum(counts, 1), 0.0)
    if clip_class is not None:
        if counts[clip_class] > 0:
            w = np.minimum(w, w[clip_class])
        else:
            logger.warning("class %d is absent: class weights are not clipped", clip_class)
    return w


def image_weights(y: np.ndarray, reduce: str = "max", clip_class: int | None = 8) -> np.ndarray:
    """Per-image sampling weight ``(N,)``, normalised to mean 1.

    ``reduce`` combines the class weights of an image's labels (``"max"`` or ``"mean"``);
    an image without labels gets the smallest non-zero class weight.
    """
    y = np.asarray(y, dtype=np.float64)
    w = class_weights(y, clip_class)
    floor = w[w > 0].min() if (w > 0).any() else 1.0
    per = y * w[None, :]
    n_labels = y.sum(1)
    if reduce == "max":
        out = per.max(1)
    elif reduce == "mean":
        out = per.sum(1) / np.maximum(n_labels, 1)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', not {reduce!r}")
    out = np.where(n_labels > 0, out, floor)
    return out / out.mean()


def make_sampler(weights: np.ndarray, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """A seeded :class:`WeightedRandomSampler` (with replacement) over ``weights``."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    n = len(weights) if num_samples is None else int(num_samples)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), n, replacement=True, generator=g)


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling that splits one shared draw between the ranks.

    Every rank draws the same ``num_samples`` indices (multinomial with replacement,
    generator seeded with ``seed + epoch``) and keeps every ``world_size``-th one
    starting at ``rank``; so the ranks together see exactly the single-process sample.
    Call :meth:`set_epoch` each epoch, like ``DistributedSampler``.
    """

    def __init__(
        self,
        weights: np.ndarray,
        num_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        total = len(weights) if num_samples is None else int(num_samples)
        self.num_samples = math.ceil(total / world_size)  # per rank
        self.total_size = self.num_samples * world_size  # padded so every rank gets as many
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shared_draw(self) -> torch.Tensor:
        """The draw all ranks share this epoch (``total_size`` indices)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.shared_draw()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
