"""``python -m hpa_kernel.train --config CONFIG [--epochs N] [--out DIR] [--resume LAST | --init-from CKPT] ...``

Single process, or one rank of ``torchrun --nproc_per_node N -m hpa_kernel.train ...``
(``batch_size`` is per rank). A bad config, a missing index / resume / init / pretrained
file: one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hpa_kernel.train.config import TrainConfigError, load_train_config, parse_override


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train", description="Train a Puzzle-CAM classifier.")
    ap.add_argument("--config", type=Path, help="JSON or YAML TrainConfig")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", dest="batch_size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--out", type=str)
    ap.add_argument("--resume", type=str, help="last.pt of this stage: continue it (optimiser, schedule, epoch)")
    ap.add_argument("--init-from", dest="init_from", type=str,
                    help="best.pt/last.pt of an earlier stage: start a new stage from its weights")
    ap.add_argument("--pretrained-file", dest="pretrained_file", type=str, help="local ImageNet weights (timm)")
    ap.add_argument("--fold", type=int)
    ap.add_argument("--index-csv", dest="index_csv", type=str)
    ap.add_argument("--backbone", type=str)
    ap.add_argument("--image-size", dest="image_size", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--max-batches", dest="max_batches", type=int, help="cap batches per epoch (smoke runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config key, e.g. augment.noise.p=0.3 or pretrained=false")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def resume_hint(cfg) -> str:
    """The one line a Ctrl-C prints: how to go on from the last finished epoch."""
    out = Path(cfg.out)
    last = out / "last.pt"
    if not last.is_file():
        return f"interrupted before the first epoch ended: nothing to resume in {out}; start the command again"
    stage = " --set init_from=null" if cfg.init_from else ""  # the stage's weights are in last.pt now
    return (f"interrupted: resume from the last finished epoch with: python -m hpa_kernel.train "
            f"--config {out / 'config.json'} --resume {last}{stage}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "set", "verbose")}
    try:
        sets = [parse_override(item) for item in args.set]
        cfg = load_train_config(args.config, overrides, sets)
        cfg.check_files()
    except TrainConfigError as e:
        logging.getLogger("hpa_kernel.train").error("%s", e)
        return 2
    from hpa_kernel.train.engine import run_summary, train
    from hpa_kernel.train.pretrained import PretrainedError

    try:
        history = train(cfg)
    except (TrainConfigError, PretrainedError) as e:
        logging.getLogger("hpa_kernel.train").error("%s", e)
        return 2
    except (ValueError, OSError) as e:  # bad data (no training images, an unreadable index or last.pt ...)
        logging.getLogger("hpa_kernel.train").debug("details", exc_info=True)
        logging.getLogger("hpa_kernel.train").error("%s: %s (-v shows where)", type(e).__name__, e)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print(resume_hint(cfg), file=sys.stderr)
        return 130
    if rank == 0:
        print(run_summary(cfg, history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
