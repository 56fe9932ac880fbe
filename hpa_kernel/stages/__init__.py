"""The stages of the kernel: functions of arrays, in pipeline order.

* :mod:`~hpa_kernel.stages.labels`: label-image helpers every stage shares.
* :mod:`~hpa_kernel.stages.segmentation`: cell segmentation, segmenters behind one interface.
* :mod:`~hpa_kernel.stages.model`: the Puzzle-CAM classifier and its checkpoints.
* :mod:`~hpa_kernel.stages.step1`: per-cell scores from the image's class maps (CAM ∩ cell).
* :mod:`~hpa_kernel.stages.step2`: per-cell scores from cell crops.
* :mod:`~hpa_kernel.stages.ensemble`: Step 1 × Step 2, models, the class-selection rule.
* :mod:`~hpa_kernel.stages.predictor`: one object that predicts one image with all of them.

Stages never import :mod:`hpa_kernel.run`, :mod:`hpa_kernel.tools` or
:mod:`hpa_kernel.formats` (see ``docs/ARCHITECTURE.md``; ``tests/test_layout.py`` checks).
"""
