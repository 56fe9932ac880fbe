"""Cell segmentation of 512 px RGBY images (DESIGN 2.1).

Two methods, chosen by :class:`hpa_kernel.config.SegmentationConfig`:

``"hpa"``
    The hpacellseg DPN-92 U-Nets (:func:`load_hpa_unet`) on the S x S image,
    then hpacellseg's ``label_cell`` either at S with scaled thresholds
    (``scale="512"``, the fast path) or on the maps resized to the original
    size (``scale="full"``, the stock flow; the labels are then brought back
    to S x S with nearest-neighbour).
``"classic"``
    A weight-free segmenter (:func:`segment_classic`), the default when no
    segmentation weights are given.

Either way every image gives a :class:`SegResult` of S x S ``int32`` label
images; the pipeline scales them to the original size when it encodes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from hpa_kernel.config import SegmentationConfig
from hpa_kernel.rle import resize_labels
from hpa_kernel.segmentation.classic import segment_classic
from hpa_kernel.segmentation.inference import predict_hpa
from hpa_kernel.segmentation.postprocess import label_cell, label_nuclei, scale_factors
from hpa_kernel.segmentation.weights import WeightFileError, load_hpa_unet  # noqa: F401 (re-export)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "SegResult",
    "Segmenter",
    "segment",
    "load_hpa_unet",
    "predict_hpa",
    "label_cell",
    "label_nuclei",
    "segment_classic",
]


@dataclass
class SegResult:
    """Segmentation of one S x S image: ``cells`` and ``nuclei``, (S, S) int32,
    0 = background. Nuclei carry the label of their cell."""

    cells: np.ndarray
    nuclei: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.cells.max(initial=0))


def _consistent_relabel(cells: np.ndarray, nuclei: np.ndarray) -> SegResult:
    """Make cell labels consecutive (some may vanish when downsized) and map
    the nuclei through the same table."""
    cells = np.asarray(cells, dtype=np.int32)
    nuclei = np.asarray(nuclei, dtype=np.int32)
    ids = np.unique(cells)
    ids = ids[ids > 0]
    lut = np.zeros(max(int(cells.max(initial=0)), int(nuclei.max(initial=0))) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return SegResult(cells=lut[cells], nuclei=lut[nuclei])


class Segmenter:
    """Segment batches of S x S RGBY images with one configured method.

    Parameters
    ----------
    config : SegmentationConfig, optional
        Method, weight paths, scale and batch size (default: classic).
    device : str or torch.device
        Where the U-Nets run (method "hpa").
    fp16 : bool
        float16 autocast for the U-Nets (CUDA only).
    models : (nuclei_model, cell_model), optional
        Already loaded networks, instead of loading ``config.nuclei`` /
        ``config.cell``.

    The U-Nets are loaded once, here; a missing or wrong weight file raises
    the loader's ``WeightFileError``.
    """

    def __init__(
        self,
        config: SegmentationConfig | None = None,
        device: "str | torch.device" = "cpu",
        fp16: bool = False,
        models: "tuple[nn.Module, nn.Module] | None" = None,
    ) -> None:
        self.config = config if config is not None else SegmentationConfig()
        self.device = device
        self.fp16 = fp16
        self.nuc_model = self.cell_model = None
        #: seconds spent in the U-Net forwards so far (callers split network vs. post-processing)
        self.network_seconds = 0.0
        method = self.config.method
        if self.config.scale not in ("512", "full"):
            raise ValueError(f"segmentation scale must be '512' or 'full', not {self.config.scale!r}")
        if method == "hpa":
            if models is not None:
                self.nuc_model, self.cell_model = models
            else:
                if self.config.nuclei is None or self.config.cell is None:
                    raise ValueError("segmentation method 'hpa' needs both 'nuclei' and 'cell' weight paths")
                self.nuc_model = load_hpa_unet(self.config.nuclei, device)
                self.cell_model = load_hpa_unet(self.config.cell, device)
            logger.info(
                "segmentation: hpacellseg U-Nets on %s, label_cell at %s",
                device,
                "512 px (scaled thresholds)" if self.config.scale == "512" else "full resolution",
            )
        elif method == "classic":
            logger.info(
                "segmentation: no segmentation weights given, using the weight-free classic segmenter"
            )
        else:
            raise ValueError(f"segmentation method must be 'classic' or 'hpa', not {method!r}")

    @property
    def method(self) -> str:
        return self.config.method

    def segment(self, images: np.ndarray, orig_sizes: Sequence[tuple[int, int]]) -> list[SegResult]:
        """Segment a batch.

        Parameters
        ----------
        images : (B, S, S, 4) float32
            RGBY in [0, 1] (a single (S, S, 4) image is accepted too).
        orig_sizes : sequence of (width, height)
            Original size of each image: sets the threshold scale (fast path)
            or the size the stock flow runs at.

        Returns
        -------
        list of SegResult, one per image, labels (S, S) int32.
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 4:
            raise ValueError(f"images must be (B, S, S, 4) RGBY, got shape {images.shape}")
        orig_sizes = [(int(w), int(h)) for w, h in orig_sizes]
        if len(orig_sizes) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(orig_sizes)} original sizes")
        if self.method == "classic":
            out = []
            for image in images:
                cells, nuclei = segment_classic(image)
                out.append(SegResult(cells=cells, nuclei=nuclei))
            return out
        t0 = time.perf_counter()
        nuc, cell = predict_hpa(
            self.nuc_model, self.cell_model, images, self.device, self.fp16,
            batch_size=max(1, int(self.config.batch_size)),
        )
        self.network_seconds += time.perf_counter() - t0  # predict_hpa returns host arrays: synced
        return [self._label(n, c, size) for n, c, size in zip(nuc, cell, orig_sizes)]

    def _label(self, nuc: np.ndarray, cell: np.ndarray, orig_size: tuple[int, int]) -> SegResult:
        shape = nuc.shape[:2]
        if self.config.scale == "512":
            nuclei, cells = label_cell(nuc, cell, scale=scale_factors(shape, orig_size))
            return SegResult(cells=cells, nuclei=nuclei)
        # Stock flow: maps resized to the original size (cv2 INTER_AREA, as
        # hpacellseg does), label_cell at full resolution, labels back to S.
        width, height = orig_size
        nuc_full = cv2.resize(nuc, (width, height), interpolation=cv2.INTER_AREA)
        cell_full = cv2.resize(cell, (width, height), interpolation=cv2.INTER_AREA)
        nuclei, cells = label_cell(nuc_full, cell_full, scale=1.0)
        # resize_labels gives uint16/int32; _consistent_relabel makes them int32
        h, w = shape
        return _consistent_relabel(resize_labels(cells, w, h), resize_labels(nuclei, w, h))


def segment(
    images: np.ndarray,
    orig_sizes: Sequence[tuple[int, int]],
    config: SegmentationConfig | None = None,
    device: "str | torch.device" = "cpu",
    fp16: bool = False,
) -> list[SegResult]:
    """One-shot :meth:`Segmenter.segment` (loads the weights on every call:
    build a :class:`Segmenter` once to segment many batches)."""
    return Segmenter(config, device=device, fp16=fp16).segment(images, orig_sizes)
