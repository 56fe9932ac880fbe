"""Convert a third-place team checkpoint into the kernel's self-describing checkpoint.

Usage::

    python -m hpa_kernel.tools.import_checkpoint SRC --out DST [--backbone NAME] [--image-size N] [--crop-size N]

``SRC`` is one of the team's ``model_best.pt`` files (siamese, plain or ``DataParallel``,
saved on a GPU or not). Backbone and image size come from the team's run folder name above
``SRC`` when it is there (``siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0/...``), else
from the flags; ``--crop-size`` (Step 2) defaults to the name's crop, else 384. ``DST`` carries
the meta (``"input": "mpware"``: the model is fed the team's way). The file is read with
``weights_only=True``; a file that does not fit is refused in one line naming it (exit 2).
A manifest may also name the team's file as it is (``"format": "mpware"``), without this step.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from hpa_kernel.stages.model import CheckpointError
from hpa_kernel.stages.mpware import import_checkpoint

__all__ = ["build_parser", "main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``hpa_kernel.tools.import_checkpoint``."""
    parser = argparse.ArgumentParser(
        prog="python -m hpa_kernel.tools.import_checkpoint",
        description="Write the kernel's checkpoint (with meta) from a third-place team model_best.pt.",
    )
    parser.add_argument("src", type=Path, help="the team's checkpoint (model_best.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    parser.add_argument("--backbone", help="timm backbone name, if no team run folder name says it")
    parser.add_argument("--image-size", type=_positive, help="input side, if no team run folder name says it")
    parser.add_argument("--crop-size", type=_positive, help="Step 2 crop side (default: the name's, else 384)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert; return the exit status (0 written, 2 refused)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model = import_checkpoint(args.src, args.out, args.backbone, args.image_size, args.crop_size)
    except (CheckpointError, OSError) as e:
        print(f"import_checkpoint: {e}", file=sys.stderr)
        return 2
    meta = model.meta
    print(
        f"wrote {args.out}: {meta['backbone']}, {meta['image_size']} px input, {meta['crop_size']} px crops, "
        f"input pipeline {meta['input']} (from {meta['source']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
