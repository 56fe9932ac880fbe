"""How to run: :class:`RunOptions`, the command-line options, and their one serialisation.

:func:`build_parser` defines every option of ``python -m hpa_kernel.submit`` (through
:func:`add_options`, which returns them); :func:`to_argv` writes parsed options back as a
command line (every option not at its default, whatever it is), and :func:`shard_argv` is that command line for one
``--parallel`` shard with :data:`SHARD_SET` replaced: a new option reaches the shards
without anyone remembering to pass it (``tests/test_options.py`` checks every one).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hpa_kernel import __version__
from hpa_kernel.formats.images import DEFAULT_MAX_PIXELS

__all__ = [
    "RunOptions",
    "build_parser",
    "add_options",
    "to_argv",
    "shard_argv",
    "SHARD_SET",
    "select_ids",
    "parse_shard",
    "parse_duration",
    "parse_parallel",
    "parse_pixels",
]


@dataclass
class RunOptions:
    """How to run; everything that is not in the weights manifest."""

    data_dir: Path
    out: Path
    device: str = "auto"
    fp16: bool | None = None  # None = on for CUDA, off on CPU
    batch_size: int | None = None  # Step 2 crop batch size (manifest default)
    workers: int = 2
    max_images: int | None = None
    shard: tuple[int, int] | None = None  # (index, count)
    time_budget: float | None = None  # seconds for the whole run
    tta: bool = False
    save_overlays: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # per channel, from the PNG header; larger images get empty rows
    save_cells: Path | None = None  # per-cell export folder (a shard: its shard-I-of-N/ subfolder)
    overwrite_cells: bool = False  # replace a --save-cells export of other settings instead of refusing it
    verify_weights: bool = True
    resume: bool = True
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace, data_dir: Path, out: Path, time_budget: float | None) -> "RunOptions":
        """From parsed options; ``data_dir``/``out``/``time_budget`` as the CLI resolved them."""
        return cls(
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
            max_pixels=args.max_pixels,
            save_cells=args.save_cells,
            overwrite_cells=args.overwrite_cells,
            verify_weights=not args.no_verify,
            resume=not args.no_resume,
            progress=not args.no_progress and not args.quiet,
        )


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N (e.g. 0/4), not {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def parse_duration(text: str) -> float:
    """Seconds (finite, > 0) from '3600', '90m', '8.5h' or '45s'."""
    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        seconds = float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"--time-budget wants seconds > 0 or e.g. 90m / 8.5h, not {text!r}")
    return seconds


def _count(low: int, flag: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (the message names ``flag``)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = None
        if n is None or n < low:
            raise argparse.ArgumentTypeError(f"{flag} wants an integer >= {low}, not {text!r}")
        return n

    parse.__name__ = f"integer >= {low}"
    return parse


def parse_pixels(text: str) -> int:
    """A pixel count >= 1: ``50000000``, ``50e6`` or ``50M``."""
    t = text.strip().upper()
    mult = 1_000_000 if t.endswith("M") else 1
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        v = 0.0
    if not (v >= 1 and v == int(v) and v < 2**62):
        raise argparse.ArgumentTypeError(f"--max-pixels wants a number of pixels >= 1 (e.g. 50000000 or 50M), not {text!r}")
    return int(v)


def parse_parallel(text: str) -> str | int:
    """``"auto"`` or a number >= 1."""
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
    """Every option of ``python -m hpa_kernel.submit``."""
    p = argparse.ArgumentParser(
        prog="python -m hpa_kernel.submit",
        description="HPA single-cell classification: images -> submission.csv",
        epilog="Run 'python -m hpa_kernel.submit merge -h' to join shard outputs.",
    )
    add_options(p)
    p.add_argument("--version", action="version", version=f"hpa_kernel {__version__}")
    return p


def add_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Add every option of ``submit`` but ``--help`` / ``--version`` to ``p``; returns them
    in order (what :func:`to_argv` writes back)."""
    fp = p.add_mutually_exclusive_group()
    return [
        p.add_argument("--data-dir", type=Path, help="Kaggle-layout folder (test/ + sample_submission.csv)"),
        p.add_argument("--weights", type=Path, help="weights manifest (default: the bundled demo manifest)"),
        p.add_argument("--out", type=Path, help="output CSV (default ./submission.csv, on Kaggle /kaggle/working/...)"),
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto: the GPU if this torch can run on it, else the CPU with a warning)"),
        fp.add_argument("--fp16", dest="fp16", action="store_true", default=None, help="fp16 autocast (default on CUDA)"),
        fp.add_argument("--no-fp16", dest="fp16", action="store_false", help="full precision on CUDA"),
        p.add_argument("--batch-size", type=_count(1, "--batch-size"), help="Step 2 crop batch size (default from the manifest)"),
        p.add_argument("--workers", type=_count(0, "--workers"), default=2,
                       help="image decoding threads (default 2; 0 = decode in the main thread)"),
        p.add_argument("--max-images", type=_count(1, "--max-images"), help="only the first N images (of each shard with --shard or --parallel)"),
        p.add_argument("--shard", type=parse_shard, help="I/N: run every N-th image starting at I (merge afterwards)"),
        p.add_argument("--parallel", type=parse_parallel, default="auto",
                       help="processes, each on its own shard and device (default auto: one per usable GPU when there are several)"),
        p.add_argument("--time-budget", type=parse_duration, help="seconds (or 90m, 8.5h) the whole run may take (default: none; 8.5h on Kaggle)"),
        p.add_argument("--tta", action="store_true", help="flip test-time augmentation"),
        p.add_argument("--max-pixels", type=parse_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"refuse (empty row) an image whose PNG header declares more than N pixels per channel "
                            f"(default {DEFAULT_MAX_PIXELS:,}, 50 MP; HPA images are at most 3072x3072 = 9.4 MP)"),
        p.add_argument("--save-overlays", type=Path, metavar="DIR", help="write a PNG per image with cell outlines"),
        p.add_argument("--save-cells", type=Path, metavar="DIR",
                       help="write the per-cell export (label PNGs + per-model Step 1/Step 2/ensembled scores) to DIR, "
                            "resumable; a --shard/--parallel shard writes DIR/shard-I-of-N (docs/TEAM_ENSEMBLING.md)"),
        p.add_argument("--overwrite-cells", action="store_true",
                       help="replace a --save-cells export written with other settings (default: refuse it, exit 2)"),
        p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of weight files (sizes still checked)"),
        p.add_argument("--no-resume", action="store_true", help="ignore the journal of an interrupted run"),
        p.add_argument("--allow-outside-paths", action="store_true", help="let the manifest name files outside its folder"),
        p.add_argument("--no-progress", action="store_true", help="no progress bar"),
        p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only"),
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging"),
    ]


def _text(value: Any) -> str:
    """An option value as its parser reads it back (``(I, N)`` -> ``"I/N"``)."""
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value)
    return str(value)


def to_argv(args: argparse.Namespace) -> list[str]:
    """The command line that parses back to ``args``: every option not at its default."""
    parser = argparse.ArgumentParser(add_help=False)
    actions = add_options(parser)
    defaults = vars(parser.parse_args([]))  # not get_default(): it skips None (--fp16's)
    argv: list[str] = []
    for action in actions:
        value = getattr(args, action.dest)
        if value == defaults[action.dest]:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false / store_const
            if value == action.const:
                argv.append(flag)
        else:
            argv += [flag, _text(value)]
    return argv


#: What :func:`shard_argv` sets for a shard; every other option is passed on as given.
SHARD_SET = ("data_dir", "out", "device", "shard", "time_budget", "parallel", "no_progress", "no_resume",
             "overwrite_cells")


def shard_argv(
    args: argparse.Namespace,
    data_dir: Path,
    shard: tuple[int, int],
    device: str,
    out: Path,
    seconds_left: float | None,
    rerun: bool,
) -> list[str]:
    """The options of one ``--parallel`` shard process: ours, with the shard's data folder
    (as resolved), part file, device, index and the budget left, one process each, no
    progress bar (the parent draws one), and resuming its own journal and export when
    ``rerun`` (``--overwrite-cells`` replaced the export on the first try only)."""
    child = copy.copy(args)
    child.data_dir, child.out, child.device, child.shard = Path(data_dir), Path(out), device, shard
    child.time_budget = None if seconds_left is None else float(round(max(seconds_left, 1.0)))
    child.parallel, child.no_progress = 1, True
    if rerun:
        child.no_resume, child.overwrite_cells = False, False
    return to_argv(child)


def select_ids(ids: Sequence[str], shard: tuple[int, int] | None, max_images: int | None) -> list[str]:
    """The IDs one run does: every N-th from I (``shard = (I, N)``), then the first ``max_images``."""
    ids = list(ids)
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard {i}/{n} is not valid (need 0 <= I < N)")
        ids = ids[i::n]
    if max_images is not None:
        ids = ids[: max(int(max_images), 0)]
    return ids
