"""Synthetic HPA-like images with per-cell ground truth.

The generator draws a field of irregular, touching cells around nuclei and paints the
four HPA channels: red = microtubules, green = the protein of interest (each cell its own
classes), blue = nuclei, yellow = endoplasmic reticulum. Every cell knows its classes, so
the images serve as ground truth for the segmentation, the kernel and the metric.

All lengths are defined on a 2048 px reference field of view and scaled with the image
size, so a 512 px and a 2048 px image show the same field (cells about 4x smaller), like
the real HPA images of different cameras. Per-cell work happens on bounding-box crops.

Modules, one job each: :mod:`.cells` (geometry, label images), :mod:`.patterns` (per-cell
textures), :mod:`.acquire` (the camera), :mod:`.image` (one image and its truth),
:mod:`.dataset` (the files, written through :mod:`hpa_kernel.formats`).

Public API
----------
- :func:`make_image` -> :class:`SyntheticImage`
- :func:`write_dataset` -> a Kaggle-layout folder with per-cell truth
- :func:`sample_dataset` -> the small bundled sample set (generated on demand)
- CLI: ``python -m hpa_kernel.tools.synthetic --out DIR --images N --seed S``
"""

from __future__ import annotations

import argparse

from hpa_kernel.tools.synthetic.dataset import image_id, sample_dataset, write_dataset
from hpa_kernel.tools.synthetic.image import SyntheticImage, make_image

__all__ = ["SyntheticImage", "make_image", "write_dataset", "sample_dataset", "image_id", "main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m hpa_kernel.tools.synthetic --out DIR --images N --seed S [...]``."""
    p = argparse.ArgumentParser(prog="python -m hpa_kernel.tools.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=8, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--size", type=int, help="image side (square)")
    g.add_argument("--sizes", help="comma-separated sides or HxW, cycled: 1728,2048,768x1024")
    p.add_argument("--depth", default="8", choices=["8", "16", "mixed"])
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--jobs", type=int, default=1, help="parallel workers")
    a = p.parse_args(argv)
    sizes = a.size if a.size else (a.sizes or 2048)
    depth = a.depth if a.depth == "mixed" else int(a.depth)
    out = write_dataset(a.out, a.images, a.seed, sizes=sizes, depth=depth, split=a.split, n_jobs=a.jobs)
    print(f"wrote {a.images} images to {out}")
    return 0

