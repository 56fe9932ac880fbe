"""Weak-supervision evidence on a held-out synthetic set: mAP@0.6 of each way to score cells.

    python bench/quality.py [--weights weights/manifest.json] [--images 48] [--seed 9000]
        [--sizes 1024,1536,2048] [--out DIR] [--boot 1000] [--cams relu_max,minmax] [--json F]

The held-out images come from seeds >= 9000, never used in training or in fitting
anything (training and the ensemble-weight fit use seeds 1000-1999); sides cycle through
``--sizes`` and bit depths alternate 8/16. The manifest's classifiers score every cell
twice: on the manifest's segmenter's cells and on the ground-truth masks (resized to
512 and back like the kernel's masks), to separate segmentation error from
classification error. Columns:

- ``oracle``: the true image labels given to every cell with confidence 1 (how far
  image-level labels alone can go);
- ``step1``, ``step2``: the kernel's Step 1 (CAM ∩ cell, under the manifest's
  ``step1.cam``) and Step 2 (cell crops), from :meth:`Predictor.score
  <hpa_kernel.stages.predictor.Predictor.score>` itself (models averaged by their weights);
- ``broadcast``: each class's best ``step1`` cell score given to every cell of the image:
  the same classes and scores as Step 1, only the allocation to cells differs;
- ``ensemble``: what the kernel submits (the manifest's step weights, models, top
  classes, floor);
- ``ensemble 0.5/0.5``: the same with equal step weights, when the manifest's differ;
- for every other CAM normalisation of ``--cams``: ``broadcast/step1/ensemble <cam>``,
  Step 1 recomputed from that normalisation, everything else as the kernel's.

Scores: ``hpa_kernel.tools.metric``'s mAP@0.6 with mask IoU at the original size, each
with a 95 % bootstrap interval over images (``--boot`` resamples of the images with
replacement, the same resamples for every column, so the intervals of the paired
differences printed below each table are meaningful), per-class APs on the ground-truth
masks, and the share of cells whose classes differ from their image's.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("bench.quality")


def broadcast_scores(s1: np.ndarray) -> np.ndarray:
    """Each class's best cell score given to every cell: same classes and scores as ``s1``."""
    s1 = np.asarray(s1, dtype=np.float32)
    if len(s1) == 0:
        return s1.copy()
    return np.repeat(s1.max(axis=0, keepdims=True), len(s1), axis=0)


def bootstrap(scores_by_col: dict[str, list], n_boot: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``col -> (n_boot,)`` mAPs over image resamples (the same resamples for every column)."""
    from hpa_kernel.tools.metric import summarize

    n = len(next(iter(scores_by_col.values())))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return {c: np.array([summarize(s[i] for i in b).mAP for b in idx]) for c, s in scores_by_col.items()}


def cell_variation(truth_dir: Path) -> tuple[int, float, float, float]:
    """``(cells, share whose class set != image's, same for positive classes, absent pairs)``.

    "Positive" ignores Negative (18), which is in an image's labels as soon as one cell
    shows nothing; "absent pairs" is the share of (cell, positive image class) pairs where
    the cell lacks the class: what broadcasting the image labels gets wrong.
    """
    from hpa_kernel.classes import NEGATIVE, parse_labels

    cells = pd.read_csv(truth_dir / "cells.csv", dtype={"ID": str, "Label": str})
    sets = [set(parse_labels(s)) for s in cells.Label]
    image: dict[str, set] = {}
    for iid, s in zip(cells.ID, sets):
        image.setdefault(iid, set()).update(s)
    img = [image[i] for i in cells.ID]
    differ = np.mean([a != b for a, b in zip(sets, img)])
    differ_pos = np.mean([(a - {NEGATIVE}) != (b - {NEGATIVE}) for a, b in zip(sets, img)])
    pairs = [c in a for a, b in zip(sets, img) for c in b - {NEGATIVE}]
    return len(cells), float(differ), float(differ_pos), 1.0 - float(np.mean(pairs))


def _ci(values: np.ndarray) -> str:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return f"[{lo:.3f}, {hi:.3f}]"


def _weights_text(w) -> str:
    return f"{w:g}" if np.ndim(w) == 0 else "per class [" + ", ".join(f"{v:.2f}" for v in w) + "]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="manifest (default: the bundled weights/manifest.json)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--seed", type=int, default=9000)
    p.add_argument("--sizes", default="1024,1536,2048", help="image sides, cycled")
    p.add_argument("--out", type=Path, help="folder for the data (default: temporary; reused when present)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--cams", default="relu_max,minmax", help="CAM normalisations to compare (config.CAM_NORMS)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.seed < 9000:
        raise SystemExit("held-out seeds start at 9000 (training uses 1000-1999)")
    from tqdm.auto import tqdm

    from hpa_kernel.classes import CLASS_NAMES, NUM_CLASSES, parse_labels
    from hpa_kernel.config import CAM_NORMS, load_config
    from hpa_kernel.formats.images import load_image, read_test_set
    from hpa_kernel.stages.ensemble import combine_models, combine_steps, select_top_classes
    from hpa_kernel.stages.labels import present_ids, resize_labels
    from hpa_kernel.stages.model import classify_image
    from hpa_kernel.stages.inputs import ImageInput
    from hpa_kernel.stages.predictor import Predictor, ScoreDetail
    from hpa_kernel.stages.step1 import step1_scores
    from hpa_kernel.tools.metric import read_label_image, read_truth_index, score_image, summarize
    from hpa_kernel.tools.synthetic import write_dataset

    cfg = load_config(a.weights)
    predictor = Predictor.from_config(cfg)
    if predictor.problems or not predictor.members:
        raise SystemExit(f"manifest {cfg.source}: {'; '.join(predictor.problems) or 'no classifier'}")
    other_cams = [c for c in a.cams.split(",") if c and c != cfg.cam_norm]
    unknown = [c for c in other_cams if c not in CAM_NORMS]
    if unknown:
        raise SystemExit(f"unknown CAM normalisation(s) {unknown}; choose from {', '.join(CAM_NORMS)}")
    equal = np.ndim(cfg.step1_weight) == 0 and cfg.step1_weight == cfg.step2_weight
    members = predictor.members
    model_w = [m.weight for m in members]

    def final(s1: np.ndarray, s2: np.ndarray, w1=cfg.step1_weight, w2=cfg.step2_weight) -> np.ndarray:
        """The kernel's rules after Step 1 / Step 2, for one model set (members averaged already)."""
        return select_top_classes(combine_steps(s1, s2, w1, w2), top_n=cfg.top_classes, floor=cfg.min_confidence)

    root = a.out or Path(tempfile.mkdtemp(prefix="hpa_quality_"))
    data = root / "data"
    sizes = tuple(int(s) for s in a.sizes.split(","))
    if not (data / "sample_submission.csv").exists():
        write_dataset(data, images=a.images, seed=a.seed, sizes=sizes, depth="mixed", split="test", progress=True)
    ids = sorted(read_test_set(data)[0])[: a.images]  # the metric's image order
    truth_index = read_truth_index(data / "truth")
    image_labels = pd.read_csv(data / "train.csv", dtype={"ID": str}).set_index("ID")["Label"]
    columns = ["oracle", "broadcast", "step1", "step2", "ensemble"] + ([] if equal else ["ensemble 0.5/0.5"])
    for c in other_cams:
        columns += [f"broadcast {c}", f"step1 {c}", f"ensemble {c}"]
    seg_names = (predictor.segmenter_name, "ground truth")
    scores: dict[str, dict[str, list]] = {s: {c: [] for c in columns} for s in seg_names}
    t0 = time.perf_counter()
    for image_id in tqdm(ids, desc="quality", unit="img"):
        item = load_image(data / "test", image_id, size=512)
        image = ImageInput(item.rgby, image=item.image)  # each model fed by its own input pipeline
        gt_full = read_label_image(data / "truth", image_id)
        truth = (gt_full, truth_index.get(image_id, {}))
        seg_labels = predictor.segmenter.segment(item.image[None], [(item.width, item.height)])[0].cells
        forwards = {c: [classify_image(m.model, image.pixels(m.model.input_pipeline, m.model.data_config["image_size"] or 512),
                                       cam_norm=c) for m in members] for c in other_cams}
        for seg_name, labels in zip(seg_names, (seg_labels, resize_labels(gt_full, 512, 512))):
            cell_ids = present_ids(labels)
            detail = ScoreDetail()
            kernel = predictor.score(image, labels, cell_ids, detail=detail)
            steps = [detail.steps[m.name] for m in members]
            s1 = combine_models([s["step1"] for s in steps], model_w)
            s2 = combine_models([s["step2"] for s in steps], model_w)
            oracle = np.zeros((len(cell_ids), NUM_CLASSES), np.float32)
            oracle[:, parse_labels(image_labels[image_id])] = 1.0
            cols = {"oracle": oracle, "broadcast": broadcast_scores(s1), "step1": s1, "step2": s2, "ensemble": kernel}
            if not equal:
                cols["ensemble 0.5/0.5"] = final(s1, s2, 0.5, 0.5)
            for c, fw in forwards.items():
                sc = combine_models([step1_scores(cams, probs, labels, cell_ids) for probs, cams in fw], model_w)
                cols.update({f"broadcast {c}": broadcast_scores(sc), f"step1 {c}": sc, f"ensemble {c}": final(sc, s2)})
            up = resize_labels(labels, item.width, item.height)
            masks = [up == c for c in cell_ids]  # bench only: full-size masks for the metric
            for col, sc in cols.items():
                rows, cls = np.nonzero(sc > 0)
                dets = [(int(c), float(sc[r, c]), masks[r]) for r, c in zip(rows, cls)]
                scores[seg_name][col].append(score_image(truth[0], truth[1], dets))
            del masks, up
    elapsed = time.perf_counter() - t0

    meta = members[0].model.meta
    n_cells, differ, differ_pos, absent = cell_variation(data / "truth")
    print(f"held-out synthetic set: {len(ids)} images (seed {a.seed}, sides {a.sizes}, 8/16-bit), {n_cells} truth "
          f"cells; manifest {cfg.source}: {len(members)} classifier(s), first {meta.get('backbone')} at image_size "
          f"{meta.get('image_size')}, step1.cam {cfg.cam_norm}, step weights {_weights_text(cfg.step1_weight)} / "
          f"{_weights_text(cfg.step2_weight)}; {elapsed:.0f} s")
    print(f"cells whose class set differs from their image's: {differ:.3f}; positive classes only: "
          f"{differ_pos:.3f}; (cell, positive image class) pairs where the cell lacks the class: {absent:.3f}")
    print(f"95 % intervals from {a.boot} bootstrap resamples of the images\n")
    diffs = [("step1", "broadcast"), ("ensemble", "step1"), ("ensemble", "step2")]
    if not equal:
        diffs += [("ensemble", "ensemble 0.5/0.5")]
    for c in other_cams:
        diffs += [(f"step1 {c}", f"broadcast {c}"), (f"step1 {c}", "step1"), (f"ensemble {c}", "ensemble")]
    result = {"images": len(ids), "seed": a.seed, "manifest": str(cfg.source), "cam": cfg.cam_norm,
              "cells": n_cells, "differ": differ, "differ_positive": differ_pos, "absent_pairs": absent, "seg": {}}
    per_class, n_gt = {}, {}
    for seg_name in seg_names:
        full = {c: summarize(s) for c, s in scores[seg_name].items()}
        boot = bootstrap(scores[seg_name], a.boot)
        print(f"segmentation: {seg_name}")
        print("| column | mAP | 95 % interval |\n|---|---|---|")
        for c in columns:
            print(f"| {c} | {full[c].mAP:.4f} | {_ci(boot[c])} |")
        print("\n| difference | mAP | 95 % interval (paired) |\n|---|---|---|")
        for x, y in diffs:
            print(f"| {x} - {y} | {full[x].mAP - full[y].mAP:+.4f} | {_ci(boot[x] - boot[y])} |")
        print()
        result["seg"][seg_name] = {
            "columns": {c: {"mAP": full[c].mAP, "ci": list(np.percentile(boot[c], [2.5, 97.5]))} for c in columns},
            "diffs": {f"{x} - {y}": {"mAP": full[x].mAP - full[y].mAP,
                                     "ci": list(np.percentile(boot[x] - boot[y], [2.5, 97.5]))} for x, y in diffs},
        }
        if seg_name == "ground truth":
            per_class, n_gt = {c: full[c].per_class for c in columns}, full["step1"].n_gt
    print("per-class AP (ground-truth masks):")
    print(f"| class | n_gt | {' | '.join(columns[1:])} |")
    print("|---|---|" + "---|" * (len(columns) - 1))
    for k in sorted(n_gt):
        aps = " | ".join(f"{per_class[c].get(k, float('nan')):.3f}" for c in columns[1:])
        print(f"| {k} {CLASS_NAMES[k]} | {n_gt[k]} | {aps} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
