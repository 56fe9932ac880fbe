"""Check a submission file against the sample submission.

Usage::

    python -m hpa_kernel.tools.validate SUBMISSION --sample SAMPLE
    hpa-validate SUBMISSION --sample SAMPLE

Prints ``OK: N rows`` and exits 0 when the file is valid; otherwise prints each problem
(one line each, naming the ID and the fault) and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from hpa_kernel.formats.submission import validate_submission

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``hpa_kernel.tools.validate``."""
    parser = argparse.ArgumentParser(
        prog="python -m hpa_kernel.tools.validate",
        description="Check a submission.csv: columns, every sample ID once, sizes, triples, masks.",
    )
    parser.add_argument("submission", type=Path, help="the submission CSV to check")
    parser.add_argument("--sample", type=Path, required=True, help="sample_submission.csv of the test set")
    parser.add_argument("--max-problems", type=int, default=0, metavar="N",
                        help="print at most N problems (default: all)")
    return parser


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return max(sum(1 for line in f if line.strip()) - 1, 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the validator; return the exit status (0 valid, 1 problems)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    problems = validate_submission(args.submission, args.sample)
    if not problems:
        print(f"OK: {_count_rows(args.submission)} rows")
        return 0
    shown = problems[: args.max_problems] if args.max_problems > 0 else problems
    for problem in shown:
        print(problem)
    if len(shown) < len(problems):
        print(f"... {len(problems) - len(shown)} more")
    print(f"INVALID: {len(problems)} problem(s) in {args.submission}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
