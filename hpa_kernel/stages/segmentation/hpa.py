"""The ``hpa`` segmenter: the hpacellseg DPN-92 U-Nets and hpacellseg's ``label_cell``.

The U-Nets (:func:`~hpa_kernel.stages.segmentation.weights.load_hpa_unet`) run on the
S x S image; ``label_cell`` then runs either at S with thresholds scaled to the original
size (``scale="512"``, the fast path) or on the maps resized to the original size
(``scale="full"``, the stock flow; the labels are brought back to S x S with nearest
neighbour and renumbered).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np

from hpa_kernel.config import SegmentationConfig
from hpa_kernel.stages.labels import relabel, resize_labels
from hpa_kernel.stages.segmentation.base import SegResult, Segmenter, register_segmenter
from hpa_kernel.stages.segmentation.inference import predict_hpa
from hpa_kernel.stages.segmentation.postprocess import label_cell, scale_factors
from hpa_kernel.stages.segmentation.weights import load_hpa_unet

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["HpaSegmenter"]


@register_segmenter
class HpaSegmenter(Segmenter):
    """hpacellseg U-Nets + ``label_cell``.

    Parameters
    ----------
    config : SegmentationConfig
        ``nuclei`` / ``cell`` weight paths, ``scale`` ("512" or "full"), ``batch_size``.
    device, fp16 :
        Where the U-Nets run; float16 autocast (CUDA only).
    models : (nuclei_model, cell_model), optional
        Already loaded networks, instead of loading ``config.nuclei`` / ``config.cell``.

    The U-Nets are loaded once, here; a missing or wrong weight file raises the loader's
    ``WeightFileError``.
    """

    name = "hpa"

    def __init__(
        self,
        config: SegmentationConfig,
        device: Any = "cpu",
        fp16: bool = False,
        models: "tuple[nn.Module, nn.Module] | None" = None,
    ) -> None:
        super().__init__(config, device, fp16)
        if config.scale not in ("512", "full"):
            raise ValueError(f"segmentation scale must be '512' or 'full', not {config.scale!r}")
        if models is not None:
            self.nuc_model, self.cell_model = models
        else:
            if config.nuclei is None or config.cell is None:
                raise ValueError("segmentation method 'hpa' needs both 'nuclei' and 'cell' weight paths")
            self.nuc_model = load_hpa_unet(config.nuclei, device)
            self.cell_model = load_hpa_unet(config.cell, device)
        logger.info(
            "segmentation: hpacellseg U-Nets on %s, label_cell at %s",
            device,
            "512 px (scaled thresholds)" if config.scale == "512" else "full resolution",
        )

    def segment(self, images: np.ndarray, orig_sizes: Sequence[tuple[int, int]]) -> list[SegResult]:
        images, sizes = self.check_batch(images, orig_sizes)
        t0 = time.perf_counter()
        nuc, cell = predict_hpa(
            self.nuc_model, self.cell_model, images, self.device, self.fp16,
            batch_size=max(1, int(self.config.batch_size)),
        )
        self.network_seconds += time.perf_counter() - t0  # predict_hpa returns host arrays: synced
        return [self._label(n, c, size) for n, c, size in zip(nuc, cell, sizes)]

    def _label(self, nuc: np.ndarray, cell: np.ndarray, orig_size: tuple[int, int]) -> SegResult:
        shape = nuc.shape[:2]
        if self.config.scale == "512":
            return SegResult(label_cell(nuc, cell, scale=scale_factors(shape, orig_size)))
        # Stock flow: maps resized to the original size (cv2 INTER_AREA, as hpacellseg
        # does), label_cell at full resolution, labels back to S and renumbered (some
        # cells may vanish when downsized).
        width, height = orig_size
        nuc_full = cv2.resize(nuc, (width, height), interpolation=cv2.INTER_AREA)
        cell_full = cv2.resize(cell, (width, height), interpolation=cv2.INTER_AREA)
        cells = label_cell(nuc_full, cell_full, scale=1.0)
        h, w = shape
        return SegResult(relabel(resize_labels(cells, w, h)))
