"""Command line: ``python -m hpa_kernel.submit`` (arguments -> config -> pipeline).

With no arguments:
- on Kaggle (``/kaggle/input/hpa-single-cell-image-classification`` exists) it runs the
  competition's test set and writes ``/kaggle/working/submission.csv``;
- elsewhere it dry-runs the bundled synthetic samples (generated on first use into
  ``./hpa_kernel_samples``) with the demo weights, writes ``./submission.csv``, validates
  it and prints the local mAP against the samples' ground truth.

``python -m hpa_kernel.submit merge PART.csv [PART.csv ...] --sample SAMPLE --out FILE``
joins the outputs of ``--shard I/N`` runs into one submission.

With several usable GPUs (Kaggle's "GPU T4 x2") the images are split into one shard per
GPU, run in one process each and joined (``--parallel``, :mod:`hpa_kernel.run.parallel`).

This module only parses arguments and calls the run machinery: the options are defined in
:mod:`hpa_kernel.run.options`, the loop is :func:`hpa_kernel.run.pipeline.run`.

Exit status: 0 all images done with every model and the file validates against the
sample; 1 the file is complete but something failed: some images, a classifier file or the
segmentation weights (listed in the summary), rows cut by the time budget, or the file does
not validate; 2 nothing could be run (bad arguments or values, device, manifest, data
folder, an ``--out`` that cannot be written or that another run holds, a
``--save-overlays`` folder that cannot be written, a ``--save-cells`` export of other
settings, not one usable classifier), checked before any image is read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from hpa_kernel.run.options import build_parser

__all__ = ["main", "build_parser", "build_merge_parser"]

logger = logging.getLogger("hpa_kernel")

KAGGLE_DATA = Path("/kaggle/input/hpa-single-cell-image-classification")
KAGGLE_OUT = Path("/kaggle/working/submission.csv")
#: Default --time-budget on Kaggle: the kernel limit is 9 h; keep half an hour for start-up and writing.
KAGGLE_BUDGET = 8.5 * 3600


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa_kernel.submit merge", description="join --shard outputs")
    p.add_argument("parts", nargs="+", type=Path, help="shard CSVs")
    p.add_argument("--sample", type=Path, required=True, help="sample_submission.csv giving IDs and order")
    p.add_argument("--out", type=Path, required=True, help="merged submission")
    return p


def setup_logging(quiet: bool = False, verbose: bool = False, tag: str = "") -> None:
    """Log to stderr; ``tag`` (e.g. ``[shard 1/2]``) starts every line of a shard process.
    One line per record, and at most a few of each kind (:class:`~hpa_kernel.run.summary.RepeatFilter`)."""
    from hpa_kernel.run.summary import log_to_stderr

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s " + (f"{tag} " if tag else "") + "%(levelname)s %(name)s: %(message)s"
    log_to_stderr(level, fmt, datefmt="%H:%M:%S")  # repeated faults: the first few, then the summary


def merge_main(argv: list[str]) -> int:
    from hpa_kernel.formats.images import read_sample
    from hpa_kernel.formats.submission import prepare_output
    from hpa_kernel.run.join import join_shards

    args = build_merge_parser().parse_args(argv)
    setup_logging()
    try:
        prepare_output(args.out, [args.sample, *args.parts])  # before reading anything
    except OSError as e:
        print(f"error: --out: {e}", file=sys.stderr)
        return 2
    try:
        ids = read_sample(args.sample).ids
        join_shards(args.parts, ids, args.out, strict=True)
        n = len(ids)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.parts)} part(s), {n} rows -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C ends it with one line saying how to resume (exit 130)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        from hpa_kernel.run.parallel import PARENT_ENV

        if not os.environ.get(PARENT_ENV):  # a --parallel shard leaves the word to its parent
            print("interrupted: the rows finished so far are kept in the journal(s) beside --out "
                  "(<out>.journal); run the same command again to resume", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose, tag=f"[shard {args.shard[0]}/{args.shard[1]}]" if args.shard else "")
    if args.shard is not None:
        from hpa_kernel.run.parallel import die_with_parent

        die_with_parent()  # a shard of a --parallel run ends with its parent

    from hpa_kernel.config import ConfigError, load_config

    data_dir, out = args.data_dir, args.out
    time_budget = args.time_budget
    if data_dir is None and KAGGLE_DATA.exists():
        data_dir = KAGGLE_DATA
        out = out or KAGGLE_OUT
        if time_budget is None:
            time_budget = KAGGLE_BUDGET
            logger.info("on Kaggle: --time-budget defaults to %.1f h", KAGGLE_BUDGET / 3600)
    elif data_dir is None:
        from hpa_kernel.tools.synthetic import sample_dataset

        data_dir = sample_dataset()
        logger.info("no --data-dir: dry run on the bundled synthetic samples in %s", data_dir)
    out = out or Path("submission.csv")

    try:
        config = load_config(args.weights, allow_outside=args.allow_outside_paths)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.shard is not None and args.parallel not in ("auto", 1):
        print("error: --parallel and --shard do not go together (--parallel makes its own shards)", file=sys.stderr)
        return 2
    from hpa_kernel.run.lock import OutputBusy, hold_output

    lock = contextlib.ExitStack()
    try:  # one run per --out, taken before anything beside it is touched
        lock.enter_context(hold_output(out))
    except (OutputBusy, OSError) as e:  # busy, or the lock file cannot be made
        print(f"error: --out: {e}", file=sys.stderr)
        return 2
    with lock:
        return _locked_main(args, config, Path(data_dir), out, time_budget)


def _locked_main(args: argparse.Namespace, config, data_dir: Path, out: Path, time_budget: float | None) -> int:
    """:func:`main` once the lock of ``out`` is held: start-up checks, then the run."""
    from hpa_kernel.formats.images import SAMPLE_NAME
    from hpa_kernel.formats.submission import prepare_output
    from hpa_kernel.run.options import RunOptions
    from hpa_kernel.run.pipeline import check_start, run

    try:  # before any work: a folder, the sample or an unwritable place fails now
        prepare_output(out, [Path(data_dir) / SAMPLE_NAME])
    except OSError as e:
        print(f"error: --out: {e}", file=sys.stderr)
        return 2
    opts = RunOptions.from_args(args, data_dir, out, time_budget)
    devices = [args.device]
    if args.shard is None:
        from hpa_kernel.run.parallel import plan_devices

        devices = plan_devices(args.device, args.parallel)
    if len(devices) > 1:  # a plain run checks its start in run() itself
        from hpa_kernel.run.parallel import run_parallel

        try:
            check_start(config, opts, shards=len(devices))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rc = run_parallel(args, devices, data_dir, out, time_budget)
        if rc != 2 and not report(args, data_dir, out):
            rc = max(rc, 1)
        return rc
    try:
        summary = run(config, opts)
    except (OSError, ValueError, RuntimeError) as e:  # nothing could run: say why in one line
        logger.debug("fatal", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    valid = report(args, data_dir, out)
    return 0 if summary.ok and valid else 1


def report(args: argparse.Namespace, data_dir: Path, out: Path) -> bool:
    """Validate the finished file and score it where the data carries ground truth.

    Returns ``False`` when the file does not validate against the sample (the exit status
    is then 1), ``True`` when it does or was not validated (a shard, ``--max-images``).
    """
    from hpa_kernel.formats.images import SAMPLE_NAME

    sample = Path(data_dir) / SAMPLE_NAME
    if sample.exists() and args.shard is None and args.max_images is None:
        from hpa_kernel.formats.submission import validate_submission

        problems = validate_submission(out, sample, max_pixels=args.max_pixels)
        print("validation: OK" if not problems else f"validation: {len(problems)} problem(s)")
        for msg in problems[:20]:
            print(f"  {msg}")
        valid = not problems
    else:
        valid = True
    truth = Path(data_dir) / "truth"
    if truth.is_dir() and args.shard is None and args.max_images is None:
        from hpa_kernel.tools.metric import evaluate

        result = evaluate(out, truth)
        print(f"local mAP@0.6 (mask IoU) against {truth}: {result.mAP:.4f}")
    return valid


if __name__ == "__main__":
    sys.exit(main())
