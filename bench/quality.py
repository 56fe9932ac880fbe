"""Weak-supervision quality on a held-out synthetic set: mAP@0.6 of each way to score cells.

    python bench/quality.py [--checkpoint weights/demo/model.pt] [--images 24] [--seed 9000]

The held-out images come from seeds >= 9000, never used in training (the demo model is
trained on seeds 1000-1999). For each segmentation (the weight-free classic segmenter,
and the ground-truth masks, to separate segmentation error from classification error)
the same classifier scores every cell four ways:

- broadcast: the image-level probabilities (full-image forward) given to every cell;
- Step 1 only (CAM ∩ cell), Step 2 only (cell crops), and the ensemble (0.5 / 0.5).

An oracle row (true image labels broadcast with confidence 1) shows how far image-level
labels alone can go. Each variant is written as a submission and scored with
``hpa_kernel.tools.metric`` (mask IoU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("weights/demo/model.pt"))
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--seed", type=int, default=9000)
    p.add_argument("--sizes", default="1024,768,1536", help="image sides, cycled")
    p.add_argument("--out", type=Path, help="folder for the data and submissions (default: temporary)")
    a = p.parse_args()
    if a.seed < 9000:
        raise SystemExit("held-out seeds start at 9000 (training uses 1000-1999)")

    from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES, parse_labels
    from hpa_kernel.stages.ensemble import combine_steps
    from hpa_kernel.formats.images import load_image, read_test_set
    from hpa_kernel.tools.metric import evaluate, read_label_image
    from hpa_kernel.stages.model import classify_image, load_checkpoint
    from hpa_kernel.formats.rle import encode_label_image
    from hpa_kernel.stages.labels import resize_labels
    from hpa_kernel.stages.segmentation.classic import segment_classic
    from hpa_kernel.stages.step1 import step1_scores
    from hpa_kernel.stages.step2 import crop_cells, predict_crops
    from hpa_kernel.formats.submission import prediction_string, write_submission
    from hpa_kernel.tools.synthetic import write_dataset

    root = a.out or Path(tempfile.mkdtemp(prefix="hpa_quality_"))
    data = root / "data"
    sizes = tuple(int(s) for s in a.sizes.split(","))
    if not (data / "sample_submission.csv").exists():
        write_dataset(data, images=a.images, seed=a.seed, sizes=sizes, depth="mixed", split="test", progress=False)
    model, meta = load_checkpoint(a.checkpoint)
    ids = read_test_set(data)[0]
    truth = pd.read_csv(data / "train.csv", dtype={"ID": str}).set_index("ID")["Label"]
    variants = ("oracle image labels", "broadcast", "step1", "step2", "ensemble")
    rows: dict[tuple[str, str], dict[str, tuple[int, int, str]]] = {}
    t0 = time.perf_counter()
    for image_id in ids:
        item = load_image(data / "test", image_id, size=512)
        gt_full = read_label_image(data / "truth", image_id)
        segs = {
            "classic": segment_classic(item.image)[0],
            "ground truth": resize_labels(gt_full, 512, 512),
        }
        probs, cams = classify_image(model, item.image)
        for seg_name, labels in segs.items():
            cell_ids = np.unique(labels)
            cell_ids = cell_ids[cell_ids > 0]
            n = len(cell_ids)
            s1 = step1_scores(cams, probs, labels, cell_ids)
            crops = crop_cells(item.image, labels, cell_ids, crop_size=int(meta.get("crop_size", 384)))
            s2 = predict_crops(model, crops, batch_size=32)
            oracle = np.zeros((n, NUM_CLASSES), np.float32)
            oracle[:, parse_labels(truth[image_id])] = 1.0
            scores = {
                "oracle image labels": oracle,
                "broadcast": np.repeat(probs[None].astype(np.float32), n, axis=0),
                "step1": s1,
                "step2": s2,
                "ensemble": combine_steps(s1, s2, 0.5, 0.5),
            }
            rles = encode_label_image(labels, item.width, item.height, cell_ids=cell_ids)
            for v in variants:
                pred = prediction_string(rles, cell_ids, scores[v])
                rows.setdefault((seg_name, v), {})[image_id] = (item.width, item.height, pred)
    elapsed = time.perf_counter() - t0

    results = {}
    for (seg_name, v), r in rows.items():
        path = root / f"sub_{seg_name.replace(' ', '_')}_{v.replace(' ', '_')}.csv"
        write_submission(r, ids, path)
        results[(seg_name, v)] = evaluate(path, data / "truth")

    print(f"held-out synthetic set: {len(ids)} images (seeds {a.seed}+, sides {a.sizes}), "
          f"checkpoint {a.checkpoint} ({meta.get('backbone')}), {elapsed:.0f} s")
    print(f"\n| segmentation | {' | '.join(variants)} |")
    print("|---|" + "---|" * len(variants))
    for seg_name in ("classic", "ground truth"):
        cells = " | ".join(f"{results[(seg_name, v)].mAP:.4f}" for v in variants)
        print(f"| {seg_name} | {cells} |")
    print("\nper-class AP (ground-truth masks):")
    print(f"| class | n_gt | {' | '.join(variants[1:])} |")
    print("|---|---|" + "---|" * (len(variants) - 1))
    gt = results[("ground truth", "ensemble")]
    for c in sorted(gt.per_class):
        aps = " | ".join(f"{results[('ground truth', v)].per_class.get(c, float('nan')):.3f}" for v in variants[1:])
        print(f"| {c} {CLASS_NAMES[c]} | {gt.n_gt[c]} | {aps} |")


if __name__ == "__main__":
    main()
