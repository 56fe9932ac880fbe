"""Cell segmentation of S x S RGBY images: segmenters behind one interface.

:func:`create_segmenter` builds the segmenter a
:class:`~hpa_kernel.config.SegmentationConfig` names (``segmentation.method`` of the
manifest); every segmenter answers ``segment(images, orig_sizes) -> list[SegResult]``
with S x S ``int32`` label images (the pipeline scales them to the original size when
it encodes them). The families, one module each:

``"classic"`` (:mod:`~hpa_kernel.stages.segmentation.classic`)
    Weight-free: nuclei from the blue channel, cells grown over red + yellow.
``"hpa"`` (:mod:`~hpa_kernel.stages.segmentation.hpa`)
    The hpacellseg DPN-92 U-Nets (:mod:`.network`, :mod:`.weights`, :mod:`.inference`)
    and hpacellseg's ``label_cell`` (:mod:`.postprocess`) at scaled thresholds.

To add one: a module with a :class:`Segmenter` subclass decorated with
:func:`register_segmenter`, imported below (see ``docs/METHOD.md``, "Segmentation").
"""

from hpa_kernel.stages.segmentation.base import (
    SegResult,
    Segmenter,
    create_segmenter,
    register_segmenter,
    segmenter_names,
)
from hpa_kernel.stages.segmentation.classic import ClassicSegmenter
from hpa_kernel.stages.segmentation.hpa import HpaSegmenter

__all__ = [
    "SegResult",
    "Segmenter",
    "create_segmenter",
    "register_segmenter",
    "segmenter_names",
    "ClassicSegmenter",
    "HpaSegmenter",
]
