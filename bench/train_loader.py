"""Training-sample throughput per worker: today's path vs the recipe's, side by side, one run.

    python bench/train_loader.py [--images 64] [--samples 400] [--rounds 3] [--workdir DIR]

One worker = one process with one thread (``torch.set_num_threads(1)``,
``cv2.setNumThreads(0)``, what a DataLoader worker runs), drawing samples from a 512 px
uint8 RGBY ``.npy`` cache and collating batches of 36. Rows:

- ``before``: the trainer as of commit 0c47b6d (reproduced below): the whole 512 image, one
  ``p`` (0.5) for every augmentation group with that version's parameters, float32
  normalisation on the CPU (4 MiB per sample collated).
- ``recipe``: :class:`hpa_kernel.train.dataset.RGBYDataset` with the recipe's random 384
  crop and augmentation groups (``configs/hpa_seresnext50_512.json``), uint8 out
  (normalised later on the device).
- ``recipe, no augmentation``: load + crop + collate only (the ceiling without augmentation).

Both samples per wall-clock second and per second of the process's CPU time are printed:
on a shared machine the second is the per-core rate a dedicated worker would get.

The rows run interleaved (before, recipe, no-aug, before, ...) ``--rounds`` times and the
median is reported, so a busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from hpa_kernel.stages.model import RGBY_MEAN, RGBY_STD, normalize  # noqa: E402
from hpa_kernel.train.augment import RGBYAugment  # noqa: E402
from hpa_kernel.train.config import AugmentConfig, load_train_config  # noqa: E402
from hpa_kernel.train.dataset import RGBYDataset, collate_skipping  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH = 36


def before_transforms(p: float = 0.5, seed: int = 0) -> A.Compose:
    """The augmentation pipeline of commit 0c47b6d (``level="full"``, one ``p``)."""
    b = cv2.BORDER_REFLECT_101
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.OneOf([
            A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=b, p=1),
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), border_mode=b, p=1),
            A.ElasticTransform(alpha=30, sigma=6, border_mode=b, p=1),
            A.OpticalDistortion(distort_limit=0.2, border_mode=b, p=1),
            A.Affine(shear=(-12, 12), border_mode=b, p=1),
        ], p=p),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1), A.MotionBlur(blur_limit=(3, 7), p=1),
                 A.MedianBlur(blur_limit=(3, 5), p=1)], p=p),
        A.OneOf([A.RandomGamma(gamma_limit=(80, 120), p=1),
                 A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=1)], p=p),
        A.GaussNoise(std_range=(0.02, 0.08), p=p),
        A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.04, 0.1), hole_width_range=(0.04, 0.1),
                        fill=0, p=p),
    ], seed=seed)


class BeforeDataset(torch.utils.data.Dataset):
    """0c47b6d's RGBYDataset.__getitem__: load, augment, float32 normalise, CHW tensor."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.transform = before_transforms()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.transform(image=np.load(self.paths[i]))["image"]
        x = normalize(img.astype(np.float32) * (1.0 / 255.0), RGBY_MEAN, RGBY_STD)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.zeros(19)


def make_cache(folder: Path, n: int) -> pd.DataFrame:
    """``n`` 512 px uint8 RGBY arrays with some structure (blobs on noise) and an index."""
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[0:512, 0:512]
    for i in range(n):
        img = rng.integers(0, 40, (512, 512, 4), dtype=np.uint8)
        for _ in range(30):
            cy, cx, r = rng.integers(0, 512), rng.integers(0, 512), rng.integers(10, 40)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r, rng.integers(0, 4)] = rng.integers(80, 255)
        path = folder / f"img{i:04d}.npy"
        np.save(path, img)
        rows.append({"ID": f"img{i:04d}", "Label": str(i % 19), "path": str(path)})
    return pd.DataFrame(rows)


def rate(ds, collate, samples: int, seed: int) -> tuple[float, float]:
    """``(samples per wall second, samples per CPU second of this process)`` of ``ds[i]``
    for random ``i``, collating every ``BATCH``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ds), samples)
    t0, c0 = time.perf_counter(), time.process_time()
    batch = []
    for i in idx:
        batch.append(ds[int(i)])
        if len(batch) == BATCH:
            collate(batch)
            batch = []
    if batch:
        collate(batch)
    return samples / (time.perf_counter() - t0), samples / (time.process_time() - c0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--samples", type=int, default=400, help="samples per row per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="where the cache goes (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    np.random.seed(0)
    cfg = load_train_config(REPO / "configs" / "hpa_seresnext50_512.json")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        frame = make_cache(folder, args.images)
        rows = {
            "before   (512 whole, one p 0.5, float32 on CPU)": (BeforeDataset(list(frame["path"])), default_collate),
            "recipe   (384 crop, recipe groups, uint8)": (
                RGBYDataset(frame, cfg.image_size, RGBYAugment(cfg.augment, seed=0), crop=cfg.train_crop),
                collate_skipping),
            "recipe, no augmentation (load + 384 crop, uint8)": (
                RGBYDataset(frame, cfg.image_size, RGBYAugment(AugmentConfig(groups={}), seed=0),
                            crop=cfg.train_crop), collate_skipping),
        }
        for ds, collate in rows.values():  # warm the page cache and the code paths
            rate(ds, collate, min(40, args.samples), seed=99)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
        for r in range(args.rounds):
            for name, (ds, collate) in rows.items():
                results[name].append(rate(ds, collate, args.samples, seed=r))
    load = os.getloadavg()[0]
    print(f"# samples/s per worker (1 process, 1 thread), batch {BATCH}, {args.images} cached 512 px images, "
          f"{args.samples} samples x {args.rounds} rounds, median; load average {load:.1f}, "
          f"{os.cpu_count()} CPU(s); albumentations {A.__version__}, cv2 {cv2.__version__}")
    first = next(iter(rows))
    base_wall = statistics.median(v[0] for v in results[first])
    base_cpu = statistics.median(v[1] for v in results[first])
    print(f"{'':<52} {'wall s':>10} {'CPU s':>10}  (samples/s; CPU s = per second of this process's CPU time)")
    for name, vals in results.items():
        wall = statistics.median(v[0] for v in vals)
        cpu = statistics.median(v[1] for v in vals)
        print(f"{name:<52} {wall:10.1f} {cpu:10.1f}  {wall / base_wall:5.2f}x wall {cpu / base_cpu:5.2f}x CPU  "
              f"(rounds, wall: {', '.join(f'{v[0]:.0f}' for v in vals)})")
    bytes_before = 4 * 512 * 512 * 4
    bytes_recipe = 384 * 384 * 4
    print(f"bytes per sample to the device: before {bytes_before / 2**20:.2f} MiB (float32), "
          f"recipe {bytes_recipe / 2**20:.2f} MiB (uint8), {bytes_before / bytes_recipe:.1f}x less")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
