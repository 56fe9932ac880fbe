"""Training of the Puzzle-CAM classifier (never imported by inference).

Modules, one concern each:

- :mod:`~hpa_kernel.train.prepare`  four PNGs -> RGBY ``.npy`` cache + ``index.csv`` (CLI)
- :mod:`~hpa_kernel.train.folds`    multilabel-stratified folds, per-fold class table (CLI)
- :mod:`~hpa_kernel.train.cells`    cell tables (truth or segmentation) for Step-2-like crops (CLI)
- :mod:`~hpa_kernel.train.config`   ``TrainConfig`` dataclass, JSON/YAML + overrides
- :mod:`~hpa_kernel.train.sampler`  class-balancing weights, weighted / distributed samplers
- :mod:`~hpa_kernel.train.augment`  albumentations pipeline on 4-channel uint8/uint16 images
- :mod:`~hpa_kernel.train.dataset`  datasets over the cache (whole images, patches, cell crops)
- :mod:`~hpa_kernel.train.puzzle`   2x2 tiling / stitching, siamese forward
- :mod:`~hpa_kernel.train.losses`   ComboLoss
- :mod:`~hpa_kernel.train.metrics`  macro F1 and mAP
- :mod:`~hpa_kernel.train.distributed`  torchrun / DDP set-up (nccl on CUDA, gloo on CPU)
- :mod:`~hpa_kernel.train.engine`   the training loop (DDP aware), checkpoints
- :mod:`~hpa_kernel.train.oof`      out-of-fold per-cell Step 1 / Step 2 export (CLI)

``python -m hpa_kernel.train --config configs/demo.json`` trains.
Nothing here is imported at package import time, so ``import hpa_kernel.train`` is cheap.
"""
