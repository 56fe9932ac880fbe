"""The third-place team's seresnext50 on this machine: seconds per image, and the cost of its
input pipeline next to the PNG decode.

    python bench/mpware.py [--images 3] [--sizes 2048,3072,1728] [--out DIR] [--threads N]

1. Per image, side by side in one loop: the decode of the four PNGs (``read_rgby``), the
   kernel's own pixels (``resize_rgby``, cv2 INTER_AREA) and the team's
   (``mpware_pixels``: skimage resize with anti-aliasing + uint8 step). A second pipeline
   costs ``mpware / decode`` of a decode per image.
2. The whole kernel (``python -m hpa_kernel.submit``, classic segmentation, Step 1 at 512 px +
   Step 2 at 384 px crops) with a team-format seresnext50_32x4d file (random weights, BatchNorm
   statistics included; ``tests/team_reference.py``), alone and beside the bundled demo
   classifier (two pipelines per image); the per-stage table as the kernel prints it.

Synthetic images, 16-bit, sides cycled through ``--sizes`` (real HPA test images are 1728 to
3072 px). CPU numbers on a shared machine: absolute seconds swing, the ratios are the claim.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

RUN = "siamese_seresnext50_32x4d_512_384_RGBY_fp16_CV4_v2.0"


def pipeline_costs(data: Path) -> None:
    """Part 1: decode vs our pixels vs the team's pixels, per image."""
    from hpa_kernel.formats.images import read_rgby, read_test_set
    from hpa_kernel.stages.inputs import mpware_pixels, resize_rgby

    ids = read_test_set(data)[0]
    print(f"{'image':>12} {'side':>5} {'decode s':>9} {'ours s':>7} {'team s':>7} {'team/decode':>12}")
    tot = [0.0, 0.0, 0.0]
    for image_id in ids:
        t0 = time.perf_counter()
        rgby = read_rgby(data / "test", image_id)
        t1 = time.perf_counter()
        resize_rgby(rgby, 512)
        t2 = time.perf_counter()
        mpware_pixels(rgby, 512)
        t3 = time.perf_counter()
        d = (t1 - t0, t2 - t1, t3 - t2)
        tot = [a + b for a, b in zip(tot, d)]
        print(f"{image_id[:12]:>12} {rgby.shape[0]:>5} {d[0]:9.3f} {d[1]:7.3f} {d[2]:7.3f} {d[2] / d[0]:12.2f}")
    n = len(ids)
    print(f"{'mean':>12} {'':>5} {tot[0] / n:9.3f} {tot[1] / n:7.3f} {tot[2] / n:7.3f} {tot[2] / tot[0]:12.2f}")


def run_kernel(data: Path, manifest: Path, out: Path, threads: int | None) -> str:
    cmd = [sys.executable, "-m", "hpa_kernel.submit", "--data-dir", str(data), "--weights", str(manifest),
           "--out", str(out), "--no-progress", "-q", "--no-resume", "--allow-outside-paths"]
    env = None
    if threads:
        import os

        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode not in (0, 1):
        raise SystemExit(f"submit failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--sizes", default="2048,3072,1728")
    p.add_argument("--seed", type=int, default=9500)
    p.add_argument("--out", type=Path, help="work folder (default: temporary)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the kernel runs")
    a = p.parse_args()

    from hpa_kernel.config import DEFAULT_MANIFEST
    from hpa_kernel.tools.synthetic import write_dataset
    from team_reference import TeamSiamese, randomize, save_team_file

    work = a.out or Path(tempfile.mkdtemp(prefix="bench_mpware_"))
    data = work / "data"
    if not (data / "sample_submission.csv").exists():
        sizes = tuple(int(s) for s in a.sizes.split(","))
        write_dataset(data, images=a.images, seed=a.seed, sizes=sizes, depth=16, split="test", progress=False)
    team_file = work / "hpa-models" / RUN / "fold1" / "stage1" / "snapshots" / "model_best.pt"
    if not team_file.exists():
        save_team_file(randomize(TeamSiamese("seresnext50_32x4d"), seed=50), team_file, "cuda")
    team_entry = {"path": str(team_file), "format": "mpware"}
    demo_entry = {"path": str(DEFAULT_MANIFEST.parent / "demo" / "model.pt")}
    print("## 1. input pipelines per image (seconds)")
    pipeline_costs(data)
    for name, entries in (("team seresnext50 alone", [team_entry]), ("team seresnext50 + demo", [team_entry, demo_entry])):
        manifest = work / f"manifest_{len(entries)}.json"
        manifest.write_text(json.dumps({"segmentation": {"method": "classic"}, "classifiers": entries,
                                        "batch_size": 16}))
        print(f"\n## 2. kernel, {name} ({a.images} images)")
        print(run_kernel(data, manifest, work / f"sub_{len(entries)}.csv", a.threads).strip())


if __name__ == "__main__":
    main()
