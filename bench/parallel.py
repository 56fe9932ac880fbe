"""``submit --parallel N`` against one process, side by side on the same images.

    python bench/parallel.py [--images 24] [--size 1024] [--processes 2] [--backbone resnet10t]

Runs ``python -m hpa_kernel.submit`` on one synthetic Kaggle-layout folder twice — once with
``--parallel 1``, once with ``--parallel N --device cpu`` — with the same thread budget
(``OMP_NUM_THREADS`` = cores for the single process, cores / N for each shard), and prints
both wall times (process start to exit, model loading, joining included), their ratio, and
whether the two files are byte-identical (they are with one thread each: the float order of
the forwards depends on the thread count).

On a GPU machine the shards run one per GPU (``--parallel auto``); this CPU benchmark
measures what the machinery costs and what N processes gain on the cores alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import make_data, make_weights  # noqa: E402  (bench/pipeline.py)


def run(data: Path, manifest: Path, out: Path, parallel: int, threads: int) -> tuple[float, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(manifest),
           "--out", str(out), "--device", "cpu", "--parallel", str(parallel), "--no-progress", "-q", "--no-resume"]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
    return seconds, r.returncode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--seed", type=int, default=7000)
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="hpa_par_") as tmp:
        root = Path(tmp)
        data = make_data(root, args.images, unique=min(args.images, 6), size=args.size, seed=args.seed)
        manifest = make_weights(root, args.backbone, image_size=512, crop_size=128)
        print(f"{args.images} images of {args.size}² on {cores} cores, classic segmentation, {args.backbone} "
              f"@ 512 with 128 px crops; load average {os.getloadavg()[0]:.1f}")
        rows = []
        for label, n, threads in (("1 process", 1, cores), (f"{args.processes} processes", args.processes,
                                                              max(1, cores // args.processes))):
            seconds, rc = run(data, manifest, root / f"p{n}.csv", n, threads)
            rows.append((label, seconds, rc))
            print(f"  {label:<12} OMP_NUM_THREADS={threads}: {seconds:7.1f} s  (exit {rc})")
        speed = rows[0][1] / rows[1][1]
        print(f"speed-up of {args.processes} processes: {speed:.2f}x")
        # byte-identity needs the same thread count on both sides
        same_threads, _ = run(data, manifest, root / "one1.csv", 1, max(1, cores // args.processes))
        identical = (root / "one1.csv").read_bytes() == (root / f"p{args.processes}.csv").read_bytes()
        print(f"one process with {max(1, cores // args.processes)} thread(s) ({same_threads:.1f} s) and "
              f"{args.processes} processes wrote {'byte-identical' if identical else 'DIFFERENT'} files")


if __name__ == "__main__":
    main()
