"""Per-image cost of the kernel at 2048², split into decode / non-network work / network.

    python bench/pipeline.py [--images 20] [--memory 20,200] [--backbone resnet10t]

1. Runs the whole pipeline (classic segmentation, one Puzzle-CAM classifier, Step 1 +
   Step 2, RLE) on synthetic 2048² 8-bit images and prints, per image: the decode time of
   the four PNGs (+ the 512 px resize), everything that is not a network forward, and the
   forwards. The claim is the ratio non-network / decode (target <= 2).
2. Runs the same pipeline in fresh processes on 20 and on 200 images (the 200 are hard
   links to a few distinct images, so generation stays cheap) and prints each process's
   peak resident memory: it must stay flat (within 10 %) as the image count grows.

CPU numbers: on these shared machines absolute seconds swing; the ratios are the claim.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NETWORK = ("seg_network", "forward_full", "forward_crops")


def make_data(root: Path, n_ids: int, unique: int, size: int, seed: int) -> Path:
    """A Kaggle-layout folder of ``n_ids`` IDs that are hard links to ``unique`` images."""
    from hpa_kernel.formats import images as io
    from hpa_kernel.formats.submission import write_submission
    from hpa_kernel.tools.synthetic import write_dataset

    base = root / "base"
    if not (base / "sample_submission.csv").exists():
        write_dataset(base, images=unique, seed=seed, sizes=(size,), depth=8, split="test", progress=False)
    ids = io.read_sample(base / "sample_submission.csv").ids
    out = root / f"n{n_ids}"
    (out / "test").mkdir(parents=True, exist_ok=True)
    rows = {}
    for k in range(n_ids):
        src = ids[k % len(ids)]
        new = f"img{k:04d}"
        for ch in io.CHANNELS:
            dst = io.channel_path(out / "test", new, ch)
            if not dst.exists():
                os.link(io.channel_path(base / "test", src, ch), dst)
        rows[new] = (size, size, "")
    write_submission(rows, list(rows), out / "sample_submission.csv")
    return out


def make_weights(root: Path, backbone: str, image_size: int, crop_size: int) -> Path:
    import torch

    from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint

    folder = root / "weights"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(PuzzleCAM(backbone, pretrained=False).eval(), folder / "model.pt",
                    image_size=image_size, crop_size=crop_size)
    (folder / "manifest.json").write_text(json.dumps({
        "segmentation": {"method": "classic"},
        "classifiers": [{"path": "model.pt"}],
        "crop_size": crop_size,
        "batch_size": 16,
    }))
    return folder / "manifest.json"


def child(data: str, manifest: str, out: str) -> None:
    """One run in this process; prints JSON with stage seconds and peak RSS."""
    from hpa_kernel.config import load_config
    from hpa_kernel.run.options import RunOptions
    from hpa_kernel.run.pipeline import run

    s = run(load_config(manifest), RunOptions(data_dir=Path(data), out=Path(out), device="cpu",
                                               progress=False, resume=False))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": s.n_done, "failed": s.n_failed, "stages": dict(s.stage_seconds),
                      "wall": s.wall_seconds, "peak_mb": peak_kb / 1024}))


def run_child(data: Path, manifest: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", str(data), str(manifest), str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode not in (0, 1):
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20, help="images for the per-stage timing")
    p.add_argument("--memory", default="20,200", help="image counts for the peak-memory check ('' to skip)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--unique", type=int, default=6, help="distinct synthetic images behind the IDs")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--image-size", type=int, default=512, help="classifier input for the full image")
    p.add_argument("--crop-size", type=int, default=128, help="Step 2 crop size")
    p.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(*a.child)

    root = a.keep or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = make_weights(root, a.backbone, a.image_size, a.crop_size)
    data = make_data(root, a.images, a.unique, a.size, seed=9500)
    print(f"data: {a.images} images of {a.size}² (8-bit), classifier {a.backbone} @ {a.image_size}, "
          f"crops {a.crop_size}; prepared in {time.perf_counter() - t0:.0f} s", flush=True)

    res = run_child(data, manifest, root / "sub.csv")
    n = res["n"]
    st = res["stages"]
    decode = st.get("read", 0.0)
    net = sum(st.get(k, 0.0) for k in NETWORK)
    skip = {"read", "load_weights", "write", *NETWORK}
    non_net = sum(v for k, v in st.items() if k not in skip)
    print(f"\nper image (mean of {n}, failed {res['failed']}):")
    print(f"  {'stage':<16}{'seconds':>10}")
    for k, v in sorted(st.items(), key=lambda kv: -kv[1]):
        if k not in ("load_weights", "write"):
            print(f"  {k:<16}{v / n:>10.3f}")
    print(f"  {'-' * 26}")
    print(f"  {'decode (read)':<16}{decode / n:>10.3f}")
    print(f"  {'non-network':<16}{non_net / n:>10.3f}")
    print(f"  {'network':<16}{net / n:>10.3f}")
    print(f"  ratio non-network / decode = {non_net / max(decode, 1e-9):.2f}  (target <= 2)")

    counts = [int(c) for c in a.memory.split(",") if c.strip()]
    if counts:
        print("\npeak resident memory (fresh process per run):")
        peaks = {}
        for c in counts:
            if c == a.images:  # same images as the timing run above: reuse its result
                r = res
            else:
                d = make_data(root, c, a.unique, a.size, seed=9500)
                r = run_child(d, manifest, root / f"sub{c}.csv")
            peaks[c] = r["peak_mb"]
            print(f"  {c:>5} images: {r['peak_mb']:8.0f} MB   ({r['wall'] / c:.2f} s/image)", flush=True)
        lo, hi = peaks[min(peaks)], peaks[max(peaks)]
        print(f"  growth {min(peaks)} -> {max(peaks)} images: {100 * (hi - lo) / lo:+.1f} %  (target within 10 %)")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
