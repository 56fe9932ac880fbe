"""GPU timing of the whole kernel: full-size DPN U-Nets + seresnext50_32x4d in fp16.

    bash bench/gpu.sh            # or: python bench/gpu_pipeline.py --images 4

Random weights (no downloads): the two DPN-92 U-Nets are saved as state dicts, which
``load_hpa_unet`` reads like the public files; the classifier is an untrained
seresnext50_32x4d Puzzle-CAM at 512 px with 384 px crops. Two runs over the same
synthetic 2048² images:

1. ``hpa``: segmentation by the U-Nets (real forward cost; with random weights the
   post-processing sees meaningless maps, so its cell counts are not realistic);
2. ``classic``: the weight-free segmenter, so Step 2 sees realistic cell counts;
3. ``team``: the classic segmenter with the same backbone as a third-place team file
   (``"format": "mpware"``, their input pipeline: its ``inputs`` stage is the CPU cost
   of their skimage resize next to the GPU forwards).

Prints seconds per stage and per image for each, and the device name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--backbone", default="seresnext50_32x4d")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-fp16", action="store_true")
    a = p.parse_args()

    import torch

    from hpa_kernel.config import load_config
    from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint
    from hpa_kernel.run.options import RunOptions
    from hpa_kernel.run.pipeline import run
    from hpa_kernel.stages.segmentation.network import build_dpn_unet
    from hpa_kernel.tools.synthetic import write_dataset

    if a.device.startswith("cuda"):
        print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
    root = Path(tempfile.mkdtemp(prefix="hpa_gpu_"))
    t0 = time.perf_counter()
    write_dataset(root / "data", images=a.images, seed=9700, sizes=(a.size,), depth=8, split="test", progress=False)
    w = root / "weights"
    w.mkdir()
    torch.manual_seed(0)
    for name in ("nuclei", "cell"):
        torch.save(build_dpn_unet().state_dict(), w / f"{name}.pth")
    save_checkpoint(PuzzleCAM(a.backbone, pretrained=False).eval(), w / "clf.pt", image_size=512, crop_size=384)
    from team_reference import TeamSiamese, randomize, save_team_file

    team = Path(f"siamese_{a.backbone}_512_384_RGBY_fp16_CV4_v2.0") / "fold1" / "stage1" / "snapshots" / "model_best.pt"
    save_team_file(randomize(TeamSiamese(a.backbone), seed=1), w / team)
    print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)

    for method in ("hpa", "classic", "team"):
        seg = {"method": "hpa", "nuclei": "nuclei.pth", "cell": "cell.pth"} if method == "hpa" else {"method": "classic"}
        clf = {"path": str(team), "format": "mpware"} if method == "team" else {"path": "clf.pt"}
        (w / "manifest.json").write_text(json.dumps({"segmentation": seg, "classifiers": [clf],
                                                     "crop_size": 384, "batch_size": 32}))
        opts = RunOptions(data_dir=root / "data", out=root / f"sub_{method}.csv", device=a.device,
                          fp16=not a.no_fp16, progress=False, resume=False)
        config = load_config(w / "manifest.json")
        run(config, dataclasses.replace(opts, max_images=1, out=root / "warmup.csv"))  # warm-up (cudnn, allocator)
        s = run(config, opts)
        print(f"\n== {method}: {s.n_done} images, {s.n_failed} failed, {s.device}")
        print(s.format())


if __name__ == "__main__":
    main()
