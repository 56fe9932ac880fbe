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

Exit status: 0 all images done with every model; 1 the file is complete but something
failed: some images, a classifier file or the segmentation weights (listed in the
summary); 2 nothing could be run (bad arguments, device, manifest or data folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hpa_kernel import __version__

logger = logging.getLogger("hpa_kernel")

KAGGLE_DATA = Path("/kaggle/input/hpa-single-cell-image-classification")
KAGGLE_OUT = Path("/kaggle/working/submission.csv")
#: Default --time-budget on Kaggle: the kernel limit is 9 h; keep half an hour for start-up and writing.
KAGGLE_BUDGET = 8.5 * 3600


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N (e.g. 0/4), not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _duration(text: str) -> float:
    """Seconds from '3600', '90m', '8.5h' or '45s'."""
    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        return float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time-budget wants seconds or e.g. 90m / 8.5h, not {text!r}") from None


def _parallel(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--parallel wants auto or a number >= 1, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpa_kernel.submit",
        description="HPA single-cell classification: images -> submission.csv",
        epilog="Run 'python -m hpa_kernel.submit merge -h' to join shard outputs.",
    )
    p.add_argument("--data-dir", type=Path, help="Kaggle-layout folder (test/ + sample_submission.csv)")
    p.add_argument("--weights", type=Path, help="weights manifest (default: the bundled demo manifest)")
    p.add_argument("--out", type=Path, help="output CSV (default ./submission.csv, on Kaggle /kaggle/working/...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto: the GPU if this torch can run on it, else the CPU with a warning)")
    fp = p.add_mutually_exclusive_group()
    fp.add_argument("--fp16", dest="fp16", action="store_true", default=None, help="fp16 autocast (default on CUDA)")
    fp.add_argument("--no-fp16", dest="fp16", action="store_false", help="full precision on CUDA")
    p.add_argument("--batch-size", type=int, help="Step 2 crop batch size (default from the manifest)")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    p.add_argument("--max-images", type=int, help="only the first N images (of each shard with --shard or --parallel)")
    p.add_argument("--shard", type=_shard, help="I/N: run every N-th image starting at I (merge afterwards)")
    p.add_argument("--parallel", type=_parallel, default="auto",
                   help="processes, each on its own shard and device (default auto: one per usable GPU when there are several)")
    p.add_argument("--time-budget", type=_duration, help="seconds (or 90m, 8.5h) the whole run may take (default: none; 8.5h on Kaggle)")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--save-overlays", type=Path, metavar="DIR", help="write a PNG per image with cell outlines")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of weight files (sizes still checked)")
    p.add_argument("--no-resume", action="store_true", help="ignore the journal of an interrupted run")
    p.add_argument("--allow-outside-paths", action="store_true", help="let the manifest name files outside its folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"hpa_kernel {__version__}")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpa_kernel.submit merge", description="join --shard outputs")
    p.add_argument("parts", nargs="+", type=Path, help="shard CSVs")
    p.add_argument("--sample", type=Path, required=True, help="sample_submission.csv giving IDs and order")
    p.add_argument("--out", type=Path, required=True, help="merged submission")
    return p


def setup_logging(quiet: bool = False, verbose: bool = False, tag: str = "") -> None:
    """Log to stderr; ``tag`` (e.g. ``[shard 1/2]``) starts every line of a shard process."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s " + (f"{tag} " if tag else "") + "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")


def merge_main(argv: list[str]) -> int:
    from hpa_kernel.formats.submission import merge_submissions

    args = build_merge_parser().parse_args(argv)
    setup_logging()
    try:
        n = merge_submissions(args.parts, args.sample, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.parts)} part(s), {n} rows -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.verbose, tag=f"[shard {args.shard[0]}/{args.shard[1]}]" if args.shard else "")
    if args.shard is not None:
        from hpa_kernel.run.parallel import die_with_parent

        die_with_parent()  # a shard of a --parallel run ends with its parent

    from hpa_kernel.config import ConfigError, load_config
    from hpa_kernel.run.pipeline import RunOptions, run

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
    if args.shard is None:
        from hpa_kernel.run.parallel import plan_devices

        devices = plan_devices(args.device, args.parallel)
        if len(devices) > 1:
            return run_parallel(args, devices, Path(data_dir), out, time_budget)
    elif args.parallel not in ("auto", 1):
        print("error: --parallel and --shard do not go together (--parallel makes its own shards)", file=sys.stderr)
        return 2
    opts = RunOptions(
        data_dir=data_dir,
        out=out,
        device=args.device,
        fp16=args.fp16,
        batch_size=args.batch_size,
        workers=args.workers,
        max_images=args.max_images,
        shard=args.shard,
        time_budget=time_budget,
        tta=args.tta,
        save_overlays=args.save_overlays,
        verify_weights=not args.no_verify,
        resume=not args.no_resume,
        progress=not args.no_progress and not args.quiet,
    )
    try:
        summary = run(config, opts)
    except (OSError, ValueError, RuntimeError) as e:  # nothing could run: say why in one line
        logger.debug("fatal", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    report(args, Path(data_dir), out)
    return 0 if summary.ok else 1


def report(args: argparse.Namespace, data_dir: Path, out: Path) -> None:
    """Validate the finished file and score it where the data carries ground truth."""
    from hpa_kernel.formats.images import SAMPLE_NAME

    sample = Path(data_dir) / SAMPLE_NAME
    if sample.exists() and args.shard is None and args.max_images is None:
        from hpa_kernel.formats.submission import validate_submission

        problems = validate_submission(out, sample)
        print("validation: OK" if not problems else f"validation: {len(problems)} problem(s)")
        for msg in problems[:20]:
            print(f"  {msg}")
    truth = Path(data_dir) / "truth"
    if truth.is_dir() and args.shard is None and args.max_images is None:
        from hpa_kernel.tools.metric import evaluate

        result = evaluate(out, truth)
        print(f"local mAP@0.6 (mask IoU) against {truth}: {result.mAP:.4f}")


def _child_args(args: argparse.Namespace, data_dir: Path, rerun: bool) -> list[str]:
    """The options a shard process gets from ours (not --out/--device/--shard/--time-budget)."""
    a = ["--data-dir", str(data_dir), "--workers", str(args.workers), "--parallel", "1", "--no-progress"]
    if args.weights:
        a += ["--weights", str(args.weights)]
    if args.fp16 is not None:
        a.append("--fp16" if args.fp16 else "--no-fp16")
    if args.batch_size:
        a += ["--batch-size", str(args.batch_size)]
    if args.max_images is not None:
        a += ["--max-images", str(args.max_images)]
    if args.save_overlays:
        a += ["--save-overlays", str(args.save_overlays)]
    flags = ["tta", "no_verify", "allow_outside_paths", "quiet", "verbose"] + ([] if rerun else ["no_resume"])
    return a + [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f)]


def run_parallel(args: argparse.Namespace, devices: list[str], data_dir: Path, out: Path, time_budget: float | None) -> int:
    """One shard process per device, then the parts joined into ``out``: every ID gets its
    row. Exit status 0 when every shard finished every image, else 1."""
    from hpa_kernel.run.device import resolve_device
    from hpa_kernel.formats.images import TEST_DIR, read_test_set
    from hpa_kernel.run.parallel import Shard, join_parts, part_path, run_shards
    from hpa_kernel.run.pipeline import fallback_size, select_ids

    try:
        for d in sorted(set(devices) - {"cpu"}):
            resolve_device(d)  # a device no shard could use stops the run here, once
        ids, sample = read_test_set(data_dir)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(devices)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the output folder: {e}", file=sys.stderr)
        return 2
    shards = [Shard(i, n, d, part_path(out, i, n), select_ids(ids, (i, n), args.max_images)) for i, d in enumerate(devices)]
    logger.info("%d images in %d shard processes on %s", sum(len(s.ids) for s in shards), n, ", ".join(devices))

    def command(s: Shard, seconds_left: float | None) -> list[str]:
        cmd = [sys.executable, "-m", "hpa_kernel.submit", *_child_args(args, data_dir, rerun=s.attempts > 1),
               "--shard", f"{s.index}/{s.count}", "--device", s.device, "--out", str(s.out)]
        return cmd + ([] if seconds_left is None else ["--time-budget", f"{max(seconds_left, 1.0):.0f}"])

    result = run_shards(shards, command, time_budget, progress=not args.no_progress and not args.quiet)
    for s in shards:
        if s.stdout.exists():
            text = s.stdout.read_text().strip()
            if text:
                print(f"== shard {s.index}/{s.count} ({s.device})\n{text}")
            s.stdout.unlink()
    wanted = set().union(*(s.ids for s in shards))
    sizes = sample.sizes if sample else {}
    join_parts(result, [i for i in ids if i in wanted], out, lambda i: fallback_size(data_dir / TEST_DIR, i, sizes))
    print(result.format())
    print(f"wrote {out}")
    report(args, data_dir, out)
    return 0 if all(s.rc == 0 for s in shards) and not result.filled else 1


if __name__ == "__main__":
    sys.exit(main())
