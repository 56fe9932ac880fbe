"""Synthetic datasets on disk: the Kaggle layout with per-cell truth, and the bundled sample set."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from hpa_kernel.formats.images import CHANNELS, channel_path, write_channel
from hpa_kernel.formats.submission import write_submission
from hpa_kernel.formats.truth import write_image_labels, write_label_image, write_truth_index
from hpa_kernel.tools.synthetic.image import make_image

logger = logging.getLogger(__name__)

SizeSpec = Union[int, Sequence[int]]
DepthSpec = Union[int, str, Sequence[int]]


def image_id(rng: np.random.Generator) -> str:
    """A uuid-like hex ID (``8-4-4-4-12``), as the HPA IDs look."""
    h = "".join(f"{int(b):02x}" for b in rng.integers(0, 256, 16))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _parse_sizes(sizes: SizeSpec | Sequence[SizeSpec]) -> list[tuple[int, int]]:
    """Sides (``2048``) or ``(h, w)`` pairs, or strings ``"768x1024"`` -> list of (h, w)."""
    if isinstance(sizes, (int, np.integer)):
        return [(int(sizes), int(sizes))]
    if isinstance(sizes, str):
        sizes = [t for t in sizes.split(",") if t.strip()]
    out = []
    for sz in sizes:
        if isinstance(sz, str):
            hw = [int(p) for p in sz.lower().replace("×", "x").split("x")]
            out.append((hw[0], hw[-1]))
        else:
            h, w = (sz, sz) if isinstance(sz, (int, np.integer)) else sz
            out.append((int(h), int(w)))
    if not out:
        raise ValueError("no image sizes given")
    return out


def _parse_depths(depth: DepthSpec) -> list[int]:
    """8, 16, ``"8"``, ``"mixed"`` (8 and 16) or a list of 8 and 16 -> list of bit depths."""
    if isinstance(depth, str) and depth == "mixed":
        return [8, 16]
    out = [int(depth)] if isinstance(depth, (str, int, np.integer)) else [int(d) for d in depth]
    if not out or any(d not in (8, 16) for d in out):
        raise ValueError(f"depth must be 8, 16, 'mixed' or a list of them, got {depth!r}")
    return out


def _write_one(out: Path, split: str, seed: int, index: int, hw: tuple[int, int], depth: int) -> tuple:
    """Draw image ``index`` and write its channel PNGs and truth label image; returns
    ``(ID, width, height, image labels, cell classes)``."""
    rng = np.random.default_rng([int(seed), int(index)])
    iid = image_id(np.random.default_rng([int(seed), int(index), 1]))
    img = make_image(rng, hw[0], hw[1], depth=depth)
    for ch, name in enumerate(CHANNELS):
        write_channel(channel_path(out / split, iid, name), img.rgby[..., ch])
    write_label_image(out / "truth", iid, img.cell_labels)
    return iid, img.width, img.height, img.image_labels, img.cell_classes


def write_dataset(out: str | Path, images: int, seed: int, sizes: SizeSpec | Sequence[SizeSpec] = (2048,),
                  depth: DepthSpec = 8, split: str = "test", n_jobs: int = 1, progress: bool = True) -> Path:
    """Write ``images`` synthetic images in the Kaggle layout, with per-cell truth.

    Layout::

        out/<split>/<ID>_{red,green,blue,yellow}.png
        out/sample_submission.csv   ID,ImageWidth,ImageHeight,PredictionString (empty)
        out/train.csv               ID,Label (image labels, '|'-separated)
        out/truth/labels/<ID>.png   uint16 cell label image at the original size
        out/truth/cells.csv         ID,cell_id,Label

    Parameters
    ----------
    sizes : a side, or a list of sides / ``(h, w)`` pairs / ``"HxW"`` strings, cycled
        over the images.
    depth : 8, 16, ``"mixed"`` (8 and 16 alternating) or a list cycled over the images.
    n_jobs : joblib workers (the files do not depend on it).

    Image ``i`` is drawn from ``np.random.default_rng([seed, i])``: the same seed gives
    byte-identical files.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    out = Path(out)
    hws = _parse_sizes(sizes)
    depths = _parse_depths(depth)
    (out / split).mkdir(parents=True, exist_ok=True)
    jobs = [(i, hws[i % len(hws)], depths[i % len(depths)]) for i in range(int(images))]

    from tqdm.auto import tqdm

    it = tqdm(jobs, desc="synthetic", unit="img", disable=not progress)
    if n_jobs == 1:
        records = [_write_one(out, split, seed, i, hw, d) for i, hw, d in it]
    else:
        from joblib import Parallel, delayed

        records = Parallel(n_jobs=n_jobs)(delayed(_write_one)(out, split, seed, i, hw, d) for i, hw, d in it)

    write_submission({r[0]: (r[1], r[2], "") for r in records}, [r[0] for r in records], out / "sample_submission.csv")
    write_image_labels(out / "train.csv", {r[0]: r[3] for r in records})
    write_truth_index(out / "truth", {r[0]: r[4] for r in records})
    logger.info("wrote %d synthetic images to %s", len(records), out)
    return out


SAMPLE_SEED = 2021
SAMPLE_SIZES: tuple = (512, 768, 1024, (768, 1024), 512, 1024)
SAMPLE_DEPTHS: tuple = (8, 16)
_SAMPLE_MARKER = ".hpa_kernel_samples_complete"


def sample_dataset(out: str | Path | None = None) -> Path:
    """The bundled sample set for the README dry run (6 small test images).

    Generated on the fly into ``out`` (default ``./hpa_kernel_samples``) unless a
    complete copy is already there; fixed seed, sizes 512-1024 including one
    non-square (768 x 1024, h x w) image, 8- and 16-bit.
    """
    out = Path(out) if out is not None else Path.cwd() / "hpa_kernel_samples"
    spec = f"seed={SAMPLE_SEED} sizes={SAMPLE_SIZES} depths={SAMPLE_DEPTHS}"
    marker = out / _SAMPLE_MARKER
    if marker.is_file() and marker.read_text() == spec:
        logger.info("reusing the sample set in %s", out)
        return out
    write_dataset(out, len(SAMPLE_SIZES), SAMPLE_SEED, sizes=SAMPLE_SIZES, depth=SAMPLE_DEPTHS, progress=False)
    marker.write_text(spec)
    return out
