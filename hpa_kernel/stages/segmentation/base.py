"""The segmenter interface and its registry (the model: timm's ``register_model`` /
``create_model``).

A segmenter turns a batch of S x S RGBY images into :class:`SegResult` label images.
Each family is one class in its own module, registered under its manifest name with
:func:`register_segmenter`; :func:`create_segmenter` builds the one a
:class:`~hpa_kernel.config.SegmentationConfig` names. Adding a segmenter = one module
with one registered class (and its name in :data:`hpa_kernel.config.SEGMENTATION_METHODS`,
which the manifest is validated against).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from hpa_kernel.config import SegmentationConfig

__all__ = ["SegResult", "Segmenter", "register_segmenter", "segmenter_names", "create_segmenter"]


@dataclass
class SegResult:
    """Segmentation of one S x S image: ``cells``, (S, S) int32, 0 = background."""

    cells: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.cells.max(initial=0))


class Segmenter(abc.ABC):
    """Segment batches of S x S RGBY images.

    Subclasses set :attr:`name` (the manifest's ``segmentation.method``), take
    ``(config, device, fp16, **kwargs)`` and implement :meth:`segment`.
    """

    #: the manifest name (``segmentation.method``)
    name: str = ""

    def __init__(self, config: SegmentationConfig, device: Any = "cpu", fp16: bool = False) -> None:
        self.config = config
        self.device = device
        self.fp16 = fp16
        #: seconds spent in network forwards so far (callers split network vs. post-processing)
        self.network_seconds = 0.0

    @abc.abstractmethod
    def segment(self, images: np.ndarray, orig_sizes: Sequence[tuple[int, int]]) -> list[SegResult]:
        """Segment a batch.

        Parameters
        ----------
        images : (B, S, S, 4) float32
            RGBY in [0, 1] (a single (S, S, 4) image is accepted too).
        orig_sizes : sequence of (width, height)
            Original size of each image (segmenters that scale thresholds use it).

        Returns
        -------
        list of SegResult, one per image, labels (S, S) int32.
        """

    @staticmethod
    def check_batch(images: np.ndarray, orig_sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """``images`` as (B, S, S, 4) and the sizes as int pairs, or ``ValueError``."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 4:
            raise ValueError(f"images must be (B, S, S, 4) RGBY, got shape {images.shape}")
        sizes = [(int(w), int(h)) for w, h in orig_sizes]
        if len(sizes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(sizes)} original sizes")
        return images, sizes


_SEGMENTERS: dict[str, type[Segmenter]] = {}


def register_segmenter(cls: type[Segmenter]) -> type[Segmenter]:
    """Class decorator: make ``cls`` creatable by its :attr:`Segmenter.name`."""
    if not cls.name or cls.name in _SEGMENTERS:
        raise ValueError(f"segmenter name {cls.name!r} is empty or taken")
    _SEGMENTERS[cls.name] = cls
    return cls


def segmenter_names() -> list[str]:
    """The registered segmenter names, sorted."""
    return sorted(_SEGMENTERS)


def create_segmenter(
    config: SegmentationConfig | None = None, device: Any = "cpu", fp16: bool = False, **kwargs: Any
) -> Segmenter:
    """The segmenter ``config.method`` names (default config: the weight-free ``classic``).

    ``kwargs`` go to its class (e.g. ``models=(nuclei_net, cell_net)`` for ``hpa``). An
    unknown name raises ``ValueError``; so does a family's own refusal (e.g. missing weights).
    """
    config = config if config is not None else SegmentationConfig()
    cls: Callable[..., Segmenter] | None = _SEGMENTERS.get(config.method)
    if cls is None:
        raise ValueError(f"segmentation method must be one of {segmenter_names()}, not {config.method!r}")
    return cls(config, device=device, fp16=fp16, **kwargs)
