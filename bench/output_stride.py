"""Step 1 / Step 2 on the validation fold at encoder output stride 32 (as trained) and 16.

    python bench/output_stride.py [--stride 32,16] [--index runs/demo_cache/index.csv]
        [--truth runs/demo_data/truth] [--checkpoint weights/demo/model.pt] [--fold 0] [--cam minmax]

The numbers in ``BENCHMARKS.md`` are of the stage-1 demo (256 px input), not of the shipped
stage 2: ``git show 912d8f2:weights/demo/model.pt > runs/stage1.pt`` and pass
``--checkpoint runs/stage1.pt``.

Exploration for issue 14 (timm's ``output_stride`` as a lever for finer CAMs): the same
weights with the last stage dilated instead of strided (timm ``output_stride=16``: 16×16
class maps at 256 px input instead of 8×8), no retraining. For each stride, the fold's OOF export
(``train.oof`` with ``--cam``, default ``minmax``: stage 1's manifest rule) and, on the fold's per-cell truth, the local
mAP of Step 2 alone, 0.5/0.5, Step 1 alone and the fitted pair (``train.fit_weights``).
Validation fold only: nothing here looks at held-out images.
"""

from __future__ import annotations

import argparse
import tempfile

import timm

from hpa_kernel.stages.model import load_checkpoint
from hpa_kernel.config import KernelConfig
from hpa_kernel.train.fit_weights import fit_step_weights, match_oof, read_oof
from hpa_kernel.train.oof import export_oof


def strided(checkpoint: str, stride: int):
    """The checkpoint's model with its encoder rebuilt at ``stride`` (same weights)."""
    model, meta = load_checkpoint(checkpoint)
    if stride != 32:
        enc = timm.create_model(meta["backbone"], pretrained=False, in_chans=model.in_chans, num_classes=0,
                                global_pool="", output_stride=stride)
        enc.load_state_dict(model.encoder.state_dict())
        model.encoder = enc.eval()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stride", default="32,16")
    p.add_argument("--index", default="runs/demo_cache/index.csv")
    p.add_argument("--truth", default="runs/demo_data/truth")
    p.add_argument("--checkpoint", default="weights/demo/model.pt")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--cam", default="minmax", help="Step 1 CAM rule (config.CAM_NORMS)")
    a = p.parse_args()
    for stride in (int(s) for s in a.stride.split(",")):
        with tempfile.TemporaryDirectory() as out:
            export_oof(a.index, strided(a.checkpoint, stride), a.fold, out, KernelConfig(cam_norm=a.cam), progress=False)
            table = read_oof([out])
            fit = fit_step_weights(match_oof(table, a.truth), grid=21)
        ap = fit["ap"].mean(axis=1)
        print(f"output_stride {stride}: {len(table)} cells; step2 alone {ap[0]:.4f}, 0.5/0.5 {ap[10]:.4f}, "
              f"step1 alone {ap[-1]:.4f}, fitted step1 {fit['step1']} -> {fit['mAP']:.4f}")


if __name__ == "__main__":
    main()
