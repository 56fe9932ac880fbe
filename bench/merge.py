"""Benchmark: merging predictions by cell -- speed per image, and what a merge is worth.

    python bench/merge.py [--images 3] [--quality-images 12] [--quality-size 1024] [--repeats 3]

Speed (side by side, best of ``--repeats``): ``--images`` synthetic 2048x2048 images with 40
cells each (seeds 9000+). Submission A lists the true cells, submission B the same cells
shifted by 16 px (mask IoU about 0.8), each with 1-4 classes per cell. Timed per image:

* merge: both rows -> cells (parse, decode every distinct mask into one label image), IoU
  matching (joint bincount + assignment), weighted mean, the merged PredictionString --
  everything :func:`hpa_kernel.run.team_merge.merge_row` and the row decoding do;
* read: decoding that image's four channel PNGs (``hpa_kernel.formats.images.read_rgby``).

Target: merge below read. The end-to-end CLI (CSV read, write, validation) is timed too.

Quality: ``--quality-images`` held-out synthetic images (seed 9000, never used for tuning);
our kernel (``python -m hpa_kernel.submit``, bundled demo weights, CPU, 1 thread) against
"better" (the true cells, noisy confidences: the cell's classes ~ N(0.7, 0.2), the image's
other classes ~ N(0.3, 0.2)) and "worse" (the true cells, confidences uniform noise for the
image's classes), merged with ``python -m hpa_kernel.team_merge`` and scored with
``hpa_kernel.tools.metric`` (mask IoU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.images import read_rgby, read_sample
from hpa_kernel.team_merge import build_parser as merge_parser, main as merge_main
from hpa_kernel.tools.metric import evaluate, read_label_image, read_truth_index
from hpa_kernel.formats.rle import encode_label_image
from hpa_kernel.formats.submission import prediction_string, read_submission, write_submission
from hpa_kernel.tools.synthetic import make_image, write_dataset
from hpa_kernel.run.team_merge import MergeOptions, SubmissionInput, merge_inputs, merge_row
from hpa_kernel.formats.cells import pyarrow_available

SEED = 9000


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    s = np.zeros((n, NUM_CLASSES), np.float32)
    for i in range(n):
        cls = rng.choice(NUM_CLASSES, rng.integers(1, 5), replace=False)
        s[i, cls] = rng.random(cls.size)
    return s


def shifted(labels: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros_like(labels)
    out[d:, d:] = labels[:-d, :-d]
    return out


def speed(args, tmp: Path) -> None:
    from hpa_kernel.formats.images import CHANNELS, channel_path, write_channel

    rng = np.random.default_rng(SEED)
    rows_a, rows_b, ids = {}, {}, []
    folder = tmp / "speed" / "test"
    folder.mkdir(parents=True)
    for k in range(args.images):
        img = make_image(np.random.default_rng([SEED, k]), 2048, 2048, n_cells=40)
        image_id = f"speed{k}"
        for c, name in enumerate(CHANNELS):  # as hpa_kernel.tools.synthetic writes them
            write_channel(channel_path(folder, image_id, name), img.rgby[..., c])
        lab = img.cell_labels
        for rows, labels in ((rows_a, lab), (rows_b, shifted(lab, 16))):
            ids_k = np.unique(labels[labels > 0])
            rows[image_id] = (2048, 2048, prediction_string(encode_label_image(labels, 2048, 2048, cell_ids=ids_k),
                                                            ids_k, random_scores(rng, ids_k.size)))
        ids.append(image_id)
    a, b = tmp / "speed" / "a.csv", tmp / "speed" / "b.csv"
    write_submission(rows_a, ids, a)
    write_submission(rows_b, ids, b)
    write_submission({i: (2048, 2048, "") for i in ids}, ids, tmp / "speed" / "sample.csv")
    sa, sb = SubmissionInput(a), SubmissionInput(b)
    opts = MergeOptions()
    t_merge, t_read, cells = [], [], []
    for image_id in ids:
        def one():
            return merge_row([sa.cells(image_id, 2048, 2048), sb.cells(image_id, 2048, 2048)], [1.0, 1.0], opts)
        t_merge.append(best_of(one, args.repeats))
        t_read.append(best_of(lambda: read_rgby(folder, image_id), args.repeats))
        text = one()
        cells.append((len(set(sa.rows[image_id][2].split()[2::3])), len(set(text.split()[2::3]))))
    t0 = time.perf_counter()
    rc = merge_main([str(a), str(b), "--sample", str(tmp / "speed" / "sample.csv"), "--out",
                     str(tmp / "speed" / "m.csv"), "--no-progress", "-q"])
    t_cli = time.perf_counter() - t0
    m, r = float(np.median(t_merge)), float(np.median(t_read))
    print(f"speed: {args.images} images of 2048x2048, cells per image (input, merged): {cells}; best of {args.repeats}, median over images")
    print(f"  merge two submissions (decode + match + combine + write row): {m * 1000:7.1f} ms/image")
    print(f"  decode the image's four PNGs (io.read_rgby):                  {r * 1000:7.1f} ms/image")
    print(f"  ratio merge/read: {m / r:.2f} (target < 1)")
    print(f"  whole CLI incl. CSV read/write/validate: {t_cli / args.images * 1000:.1f} ms/image (exit {rc})")


def truth_submission(data: Path, out: Path, kind: str, rng: np.random.Generator) -> Path:
    truth = data / "truth"
    index = read_truth_index(truth)
    sample = read_sample(data / "sample_submission.csv")
    rows = {}
    for image_id in sample.ids:
        w, h = sample.sizes[image_id]
        cells = index.get(image_id, {})
        lab = read_label_image(truth, image_id)
        ids = np.array(sorted(cells), dtype=np.int64)
        image_classes = sorted({c for cl in cells.values() for c in cl})
        s = np.zeros((ids.size, NUM_CLASSES), np.float32)
        for i, cid in enumerate(ids.tolist()):
            for c in image_classes:
                if kind == "better":
                    mu = 0.7 if c in cells[cid] else 0.3
                    s[i, c] = np.clip(rng.normal(mu, 0.2), 1e-3, 1)
                else:
                    s[i, c] = rng.uniform(1e-3, 1)
        rows[image_id] = (w, h, prediction_string(encode_label_image(lab, w, h, cell_ids=ids), ids, s) if ids.size else "")
    write_submission(rows, sample.ids, out)
    return out


def quality(args, tmp: Path) -> None:
    data = tmp / "held_out"
    write_dataset(data, args.quality_images, seed=SEED, sizes=(args.quality_size,), progress=False)
    ours = tmp / "ours.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--out", str(ours),
                        "--device", "cpu", "--no-progress", "-q"], env=env, capture_output=True, text=True)
    print(f"quality: {args.quality_images} held-out synthetic images of {args.quality_size}² (seed {SEED}); "
          f"our kernel {time.perf_counter() - t0:.0f} s (exit {r.returncode})")
    if r.returncode not in (0, 1):
        print(r.stderr[-2000:])
        return
    rng = np.random.default_rng(SEED + 1)
    better = truth_submission(data, tmp / "better.csv", "better", rng)
    worse = truth_submission(data, tmp / "worse.csv", "worse", rng)
    sample, truth = data / "sample_submission.csv", data / "truth"

    def score(path: Path) -> float:
        return evaluate(path, truth).mAP

    def merged(name: str, *inputs_and_flags: str) -> Path:
        out = tmp / f"{name}.csv"
        args = merge_parser().parse_args([*inputs_and_flags, "--sample", str(sample), "--out", str(out)])
        opts = MergeOptions(weights=args.weights, reference=args.reference, unmatched=args.unmatched, mean=args.mean)
        summary = merge_inputs(args.inputs, sample, out, opts, progress=False)
        assert not summary.problems, summary.problems
        return out

    results = [
        ("ours alone", ours),
        ("better alone", better),
        ("worse alone", worse),
        ("ours + better  (1,1)", merged("ob", str(ours), str(better))),
        ("ours + better  (1,1) --unmatched take", merged("obt", str(ours), str(better), "--unmatched", "take")),
        ("ours + better  (1,1) --mean rank", merged("obr", str(ours), str(better), "--mean", "rank")),
        ("ours + better  (1,1) --reference 1", merged("obref", str(ours), str(better), "--reference", "1")),
        ("ours + worse   (1,0.05)", merged("ow05", str(ours), str(worse), "--weights", "1,0.05")),
        ("ours + worse   (1,0.2)", merged("ow2", str(ours), str(worse), "--weights", "1,0.2")),
        ("ours + worse   (1,1)", merged("ow1", str(ours), str(worse))),
    ]
    n_cells = {k: len(set(read_submission(p)[k2][2].split()[2::3])) for k, p in (("ours", ours), ("better", better))
               for k2 in list(read_submission(p))[:1]}
    print(f"  cells on the first image: ours {n_cells['ours']}, truth {n_cells['better']}")
    for name, path in results:
        print(f"  {name:40s} mAP {score(path):.4f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--quality-images", type=int, default=12)
    p.add_argument("--quality-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args()
    print(f"pyarrow installed: {pyarrow_available()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        speed(args, Path(d))
        if not args.skip_quality:
            quality(args, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
