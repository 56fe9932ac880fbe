"""Command line: merge other pipelines' predictions by cell (:mod:`hpa_kernel.run.team_merge`).

    python -m hpa_kernel.team_merge INPUT [INPUT ...] --sample sample_submission.csv --out merged.csv
        [--weights 1,0.5,...] [--iou 0.5] [--unmatched zero|take] [--mean weighted|rank]
        [--reference K]

Each INPUT is a ``submission.csv`` (any pipeline's) or a ``submit --save-cells`` folder.

Exit status: 0 merged and valid; 1 written but the validator found problems (listed);
2 bad arguments, an ``--out`` that cannot be written (a folder, the sample or an input, a
read-only place: checked before any input is read), an unreadable input or sample, or a
sample declaring a size over the pixel cap (one line ``error: ...``). A malformed row of an
input costs only that input's cells on that image: it is logged and counted in the summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from hpa_kernel.stages.cellmatch import MEANS, UNMATCHED
from hpa_kernel.run.team_merge import MergeOptions, merge_inputs
from hpa_kernel.run.summary import log_to_stderr

logger = logging.getLogger("hpa_kernel")


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights wants comma-separated numbers, e.g. 1,0.5, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa_kernel.team_merge",
                                description="Merge submissions / per-cell exports by cell (mask IoU) into one submission.")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="submission.csv or a --save-cells folder")
    p.add_argument("--sample", type=Path, required=True, help="sample_submission.csv giving the IDs, order and sizes")
    p.add_argument("--out", type=Path, required=True, help="merged submission to write")
    p.add_argument("--weights", type=_weights, help="one weight per input, e.g. 1,0.5 (default: all 1)")
    p.add_argument("--iou", type=float, default=0.5, help="mask IoU at or above which cells match (default 0.5)")
    p.add_argument("--unmatched", choices=UNMATCHED, default="zero",
                   help="zero: an input without the cell counts 0 and only the reference's cells are kept; "
                        "take: average only the inputs that have the cell, and add cells the reference lacks (default zero)")
    p.add_argument("--mean", choices=MEANS, default="weighted",
                   help="weighted mean of the scores, or of each input's per-class ranks over the run (default weighted)")
    p.add_argument("--reference", type=int, default=0, help="index of the input whose masks are used (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr(logging.WARNING if args.quiet else logging.INFO, "%(levelname)s %(name)s: %(message)s")
    opts = MergeOptions(weights=args.weights, reference=args.reference, iou=args.iou,
                        unmatched=args.unmatched, mean=args.mean)
    try:
        summary = merge_inputs(args.inputs, args.sample, args.out, opts, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
