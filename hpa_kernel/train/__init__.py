"""Training of the Puzzle-CAM classifier (never imported by inference).

Modules, one concern each:

- :mod:`~hpa_kernel.train.prepare`  four PNGs -> RGBY ``.npy`` cache + ``index.csv`` (CLI)
- :mod:`~hpa_kernel.train.folds`    multilabel-stratified folds, per-fold class table (CLI)
- :mod:`~hpa_kernel.train.cells`    cell tables (segmentation: image labels; synthetic truth: evaluation only) (CLI)
- :mod:`~hpa_kernel.train.config`   ``TrainConfig`` (defaults = the third-place recipe), JSON/YAML + overrides
- :mod:`~hpa_kernel.train.sampler`  the recipe's class-balancing weights, distributed sampler (CLI)
- :mod:`~hpa_kernel.train.augment`  augmentation groups (albumentations 2.x) on 4-channel images
- :mod:`~hpa_kernel.train.dataset`  datasets over the cache (random crops, uint8 out, skipped samples)
- :mod:`~hpa_kernel.train.pretrained`  local ImageNet weights / earlier stage / random start
- :mod:`~hpa_kernel.train.puzzle`   2x2 tiling / stitching, siamese forward
- :mod:`~hpa_kernel.train.losses`   ComboLoss
- :mod:`~hpa_kernel.train.metrics`  macro F1 and mAP (the metric's AP, image-level)
- :mod:`~hpa_kernel.train.distributed`  torchrun / DDP set-up (nccl on CUDA, gloo on CPU)
- :mod:`~hpa_kernel.train.engine`   the training loop (DDP aware), checkpoints
- :mod:`~hpa_kernel.train.oof`      out-of-fold per-cell Step 1 / Step 2 export (CLI)

``python -m hpa_kernel.train --config configs/hpa_seresnext50_512.json`` trains the recipe.
Nothing here is imported at package import time, so ``import hpa_kernel.train`` is cheap.
"""
