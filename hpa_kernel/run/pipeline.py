"""The orchestrator: every stage of the kernel, in the pipeline's fixed order.

    read RGBY -> 512 px float -> segmentation -> full-image forward -> Step 1
        -> cell crops -> Step 2 -> ensemble -> masks to original size -> RLE -> row

:func:`run` streams the images of a Kaggle-layout folder through these stages one at a
time while worker threads decode the next ones, keeps a journal so an interrupted run
resumes where it stopped, degrades to cheaper settings when a time budget would be
exceeded, and always writes a complete ``submission.csv`` (every sample ID gets a row;
an image that fails at any stage gets an empty row and is listed in the summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hpa_kernel import __version__
from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import KernelConfig
from hpa_kernel.run.device import resolve_device

logger = logging.getLogger(__name__)

# Degradation levels used by the time budget, cheapest last.
LEVEL_FULL, LEVEL_STEP1_ONLY, LEVEL_ONE_MODEL, LEVEL_EMPTY = 0, 1, 2, 3
LEVEL_NAMES = {
    LEVEL_FULL: "full (Step 1 + Step 2, all models)",
    LEVEL_STEP1_ONLY: "Step 1 only",
    LEVEL_ONE_MODEL: "Step 1 only, first model only",
    LEVEL_EMPTY: "no prediction (empty rows) for the remaining images",
}


@dataclass
class RunOptions:
    """How to run; everything that is not in the weights manifest."""

    data_dir: Path
    out: Path
    device: str = "auto"
    fp16: bool | None = None  # None = on for CUDA, off on CPU
    batch_size: int | None = None  # Step 2 crop batch size (manifest default)
    workers: int = 2
    max_images: int | None = None
    shard: tuple[int, int] | None = None  # (index, count)
    time_budget: float | None = None  # seconds for the whole run
    tta: bool = False
    save_overlays: Path | None = None
    verify_weights: bool = True
    resume: bool = True
    progress: bool = True


@dataclass
class RunSummary:
    out: Path
    n_images: int = 0
    n_done: int = 0
    n_resumed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    level: int = LEVEL_FULL
    degraded_at: dict[int, int] = field(default_factory=dict)  # level -> images done before
    wall_seconds: float = 0.0
    device: str = "cpu"
    n_models: int = 0
    segmenter: str = ""
    #: parts of the manifest that could not be used (a classifier file, the segmentation
    #: weights): the file is complete, but not what was asked for
    component_failures: list[str] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        """Every image went through with every model of the manifest."""
        return not self.failures and not self.component_failures

    def format(self) -> str:
        """A readable multi-line summary (printed by the CLI)."""
        lines = [
            f"hpa_kernel {__version__}: {self.n_done}/{self.n_images} images"
            f" ({self.n_resumed} resumed), {self.n_failed} failed, device {self.device},"
            f" {self.n_models} model(s), segmentation {self.segmenter}",
            f"wall time {self.wall_seconds:.1f} s"
            + (f", {self.wall_seconds / max(self.n_done - self.n_resumed, 1):.2f} s/image" if self.n_done else ""),
        ]
        if self.stage_seconds:
            n = max(self.n_done - self.n_resumed, 1)
            lines.append("stage seconds (total / per image):")
            for k, v in self.stage_seconds.items():
                lines.append(f"  {k:<14} {v:9.2f}  {v / n:7.3f}")
        for level, at in sorted(self.degraded_at.items()):
            lines.append(f"time budget: switched to '{LEVEL_NAMES[level]}' after {at} images")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for image_id, reason in self.failures.items():
            lines.append(f"failed: {image_id}: {reason}")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


class StageTimer:
    """Accumulate wall time per stage name (synchronising CUDA when used)."""

    def __init__(self, totals: dict[str, float], cuda: bool = False):
        self.totals = totals
        self.cuda = cuda

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0


# ----------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    model: Any
    meta: dict[str, Any]
    weight: float


def load_models(config: KernelConfig, device: str, summary: RunSummary) -> list[LoadedModel]:
    """Load every classifier of the manifest; a bad file is skipped with an error."""
    from hpa_kernel.stages.model import load_checkpoint

    models = []
    for c in config.classifiers:
        try:
            model, meta = load_checkpoint(c.path, device=device)
        except Exception as e:  # CheckpointError and anything torch raises
            msg = f"classifier {c.path} skipped: {e}"
            logger.error(msg)
            summary.warnings.append(msg)
            summary.component_failures.append(msg)
            continue
        models.append(LoadedModel(model, meta, c.weight))
    if not models:
        msg = "no usable classifier: every image gets an empty prediction"
        logger.error(msg)
        summary.warnings.append(msg)
    return models


def build_segmenter(config: KernelConfig, device: str, fp16: bool, summary: RunSummary):
    """The segmenter of the manifest; falls back to the weight-free one on bad weights."""
    from hpa_kernel.stages.segmentation import create_segmenter as Segmenter

    try:
        seg = Segmenter(config.segmentation, device=device, fp16=fp16)
        summary.segmenter = config.segmentation.method
    except Exception as e:
        msg = f"segmentation weights unusable ({e}); using the weight-free classic segmenter"
        logger.error(msg)
        summary.warnings.append(msg)
        summary.component_failures.append(msg)
        seg = Segmenter(config.segmentation.__class__(method="classic"), device=device, fp16=fp16)
        summary.segmenter = "classic (fallback)"
    return seg


# ----------------------------------------------------------------------------- stages


def predict_image(
    image: np.ndarray,
    labels: np.ndarray,
    cell_ids: np.ndarray,
    models: list[LoadedModel],
    config: KernelConfig,
    device: str,
    fp16: bool,
    level: int,
    tta: bool,
    timer: StageTimer,
    batch_size: int,
) -> np.ndarray:
    """Per-cell, per-class scores (n, 19) for one image: Step 1, Step 2, ensemble."""
    from hpa_kernel.stages.ensemble import combine_models, combine_steps, select_top_classes
    from hpa_kernel.stages.model import classify_image
    from hpa_kernel.stages.step1 import step1_scores
    from hpa_kernel.stages.step2 import crop_cells, predict_crops

    n = len(cell_ids)
    if n == 0 or not models:
        return np.zeros((n, NUM_CLASSES), np.float32)
    use = models[:1] if level >= LEVEL_ONE_MODEL else models
    use_step2 = config.use_step2 and level == LEVEL_FULL
    use_step1 = config.step1_weight > 0 or not use_step2
    per_model, weights = [], []
    for m in use:
        s1 = s2 = None
        if use_step1:
            with timer("forward_full"):
                probs, cams = classify_image(m.model, image, device, fp16, tta)
            with timer("step1"):
                s1 = step1_scores(cams, probs, labels, cell_ids)
        if use_step2:
            crop = int(m.meta.get("crop_size", config.crop_size))
            with timer("crops"):
                crops = crop_cells(image, labels, cell_ids, crop_size=crop)
            with timer("forward_crops"):
                kw = dict(batch_size=batch_size, device=device, fp16=fp16)  # mean/std: the checkpoint's
                s2 = predict_crops(m.model, crops, **kw)
                if tta:  # flip TTA for Step 2: identity, horizontal and vertical flips averaged
                    s2 = (s2 + predict_crops(m.model, crops[..., ::-1].copy(), **kw)
                          + predict_crops(m.model, crops[..., ::-1, :].copy(), **kw)) / 3
        with timer("ensemble"):
            per_model.append(combine_steps(s1, s2, config.step1_weight, config.step2_weight))
        weights.append(m.weight)
    with timer("ensemble"):
        scores = combine_models(per_model, weights)
        scores = select_top_classes(scores, top_n=config.top_classes, floor=config.min_confidence)
    return scores


# ----------------------------------------------------------------------------- journal


def journal_path(out: Path) -> Path:
    """Where a run writing ``out`` journals its finished rows."""
    return out.with_name(out.name + ".journal")


class Journal:
    """Append-only JSON-lines record of finished rows, for resuming a killed run.

    The first line is a header holding a fingerprint of the run (data folder, IDs,
    manifest, options that change results); a journal with another fingerprint is
    ignored. Each further line is one finished image's row, flushed and fsynced.
    """

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        self.fingerprint = fingerprint
        self.rows: dict[str, tuple[int, int, str, str | None]] = {}
        if resume and path.exists():
            self._read()
        if not self.rows:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._fh = open(path, "a")

    def _read(self) -> None:
        try:
            self.rows = read_journal(self.path, self.fingerprint)
        except (OSError, ValueError, KeyError) as e:
            logger.warning("journal %s unreadable (%s); starting afresh", self.path, e)
            self.rows = {}

    def add(self, image_id: str, width: int, height: int, pred: str, error: str | None) -> None:
        self.rows[image_id] = (width, height, pred, error)
        rec = {"id": image_id, "w": width, "h": height, "p": pred}
        if error:
            rec["e"] = error
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self, remove: bool) -> None:
        self._fh.close()
        if remove:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path, fingerprint: str | None = None) -> dict[str, tuple[int, int, str, str | None]]:
    """The finished rows of a journal, ``{ID: (width, height, predstring, error)}``: empty
    when its header names another ``fingerprint`` (``None``: any). A last line cut by a
    kill ends the reading; everything before it is good."""
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or (fingerprint is not None and json.loads(lines[0]).get("fingerprint") != fingerprint):
        logger.info("journal %s belongs to another run; starting afresh", path)
        return {}
    rows = {}
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        rows[r["id"]] = (r["w"], r["h"], r["p"], r.get("e"))
    return rows


def _fingerprint(config: KernelConfig, ids: list[str], opts: RunOptions) -> str:
    h = hashlib.sha256()
    h.update(str(Path(opts.data_dir).resolve()).encode())
    h.update("\n".join(ids).encode())
    h.update(repr(config).encode())
    h.update(repr((opts.tta, __version__)).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- run


def select_ids(ids: list[str], shard: tuple[int, int] | None, max_images: int | None) -> list[str]:
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard {i}/{n} is not valid (need 0 <= I < N)")
        ids = ids[i::n]
    if max_images is not None:
        ids = ids[: max(int(max_images), 0)]
    return ids


class Budget:
    """Chooses the degradation level so that the projected end stays within the budget.

    The rate of each level is measured on the images done at that level; a level not
    yet tried is assumed to cost ``COST[level]`` times the full level's rate. When
    ``elapsed + remaining * rate(level)`` passes 95 % of the budget, the next cheaper
    level is taken; at :data:`LEVEL_EMPTY` the remaining rows are written empty.
    """

    COST = {LEVEL_FULL: 1.0, LEVEL_STEP1_ONLY: 0.6, LEVEL_ONE_MODEL: 0.45, LEVEL_EMPTY: 0.0}
    MARGIN = 0.95

    def __init__(self, seconds: float | None, start: float):
        self.seconds = seconds
        self.start = start
        self.spent: dict[int, list[float]] = defaultdict(list)

    def record(self, level: int, seconds: float) -> None:
        self.spent[level].append(seconds)

    def rate(self, level: int) -> float | None:
        if self.spent.get(level):
            return float(np.mean(self.spent[level]))
        for lv, times in sorted(self.spent.items()):
            if times and self.COST[lv] > 0:
                return float(np.mean(times)) / self.COST[lv] * self.COST[level]
        return None

    def level(self, current: int, remaining: int, now: float) -> int:
        if self.seconds is None or remaining <= 0:
            return current
        left = self.seconds * self.MARGIN - (now - self.start)
        if left <= 0:
            return LEVEL_EMPTY
        level = current
        while level < LEVEL_EMPTY:
            r = self.rate(level)
            if r is None or r * remaining <= left:
                break
            level += 1
        return level


def fallback_size(test_dir: Path, image_id: str, sample_sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Width and height for a row whose image was not (or could not be) decoded: the
    sample's where positive (``io.read_sample`` stores 0 for a missing size), else the
    first readable channel's PNG header, else ``(0, 0)``."""
    from hpa_kernel.formats.images import CHANNELS, channel_path, png_size

    width, height = sample_sizes.get(image_id, (0, 0))
    if width > 0 and height > 0:
        return width, height
    for ch in CHANNELS:
        size = png_size(channel_path(test_dir, image_id, ch))
        if size is not None:
            return size
    return (0, 0)


def process_image(item, segmenter, models, config, opts, device, fp16, level, timer, batch_size) -> str:
    """One decoded image through segmentation, the classifiers and RLE: its PredictionString."""
    from hpa_kernel.formats.rle import encode_label_image
    from hpa_kernel.stages.step1 import present_ids
    from hpa_kernel.formats.submission import prediction_string

    net0 = getattr(segmenter, "network_seconds", 0.0)
    with timer("segmentation"):
        seg = segmenter.segment(item.image[None], [(item.width, item.height)])[0]
    net = getattr(segmenter, "network_seconds", 0.0) - net0
    if net:  # report the U-Net forwards apart from the post-processing
        timer.totals["seg_network"] += net
        timer.totals["segmentation"] -= net
    labels = seg.cells
    cell_ids = present_ids(labels)
    scores = predict_image(item.image, labels, cell_ids, models, config, device, fp16, level, opts.tta, timer, batch_size)
    keep = scores.max(axis=1) > 0
    with timer("rle"):
        rles = encode_label_image(labels, item.width, item.height, cell_ids=cell_ids[keep])
        pred = prediction_string(rles, cell_ids[keep], scores[keep], config.min_confidence)
    if opts.save_overlays is not None:
        with timer("overlay"):
            from hpa_kernel.formats.overlay import save_overlay

            save_overlay(Path(opts.save_overlays) / f"{item.id}.png", item.image, labels, cell_ids, scores)
    return pred


def run(config: KernelConfig, opts: RunOptions) -> RunSummary:
    """Run the kernel over ``opts.data_dir`` and write ``opts.out``; returns the summary."""
    from tqdm.auto import tqdm

    from hpa_kernel.formats.images import TEST_DIR, load_image, read_test_set
    from hpa_kernel.run.prefetch import prefetch
    from hpa_kernel.formats.submission import write_submission

    t_start = time.perf_counter()
    out = Path(opts.out)
    summary = RunSummary(out=out)
    data_dir = Path(opts.data_dir)
    all_ids, sample = read_test_set(data_dir)
    ids = select_ids(all_ids, opts.shard, opts.max_images)
    summary.n_images = len(ids)
    sample_sizes = sample.sizes if sample else {}
    if sample and sample.duplicates:
        dups = sorted(set(sample.duplicates))
        summary.warnings.append(
            f"sample_submission.csv lists {len(dups)} duplicate ID(s), each written once: " + ", ".join(dups[:5])
        )
    test_dir = data_dir / TEST_DIR

    # 0. weights: integrity, device, models
    from hpa_kernel.integrity import verify_files

    verify_files(config, check_hash=opts.verify_weights)
    device, device_warning = resolve_device(opts.device)
    if device_warning:
        summary.warnings.append(device_warning)
    fp16 = device.startswith("cuda") if opts.fp16 is None else bool(opts.fp16)
    summary.device = device + (" fp16" if fp16 and device.startswith("cuda") else "")
    timer = StageTimer(summary.stage_seconds, cuda=device.startswith("cuda"))
    batch_size = int(opts.batch_size or config.batch_size)
    with timer("load_weights"):
        segmenter = build_segmenter(config, device, fp16, summary)
        models = load_models(config, device, summary)
    summary.n_models = len(models)

    journal = Journal(journal_path(out), _fingerprint(config, ids, opts), opts.resume)
    todo = [i for i in ids if i not in journal.rows]
    summary.n_resumed = len(ids) - len(todo)
    if summary.n_resumed:
        logger.info("resuming: %d of %d images already done", summary.n_resumed, len(ids))
    budget = Budget(opts.time_budget, t_start)

    def _load(image_id: str):
        t0 = time.perf_counter()
        return load_image(test_dir, image_id, size=config.image_size), time.perf_counter() - t0

    bar = tqdm(total=len(ids), initial=summary.n_resumed, desc="hpa_kernel", unit="img", disable=not opts.progress)
    images = prefetch(todo, _load, workers=opts.workers)
    try:
        for k, image_id in enumerate(todo):
            level = budget.level(summary.level, len(todo) - k, time.perf_counter())
            if level > summary.level:
                logger.warning("time budget: switching to %s", LEVEL_NAMES[level])
                for lv in range(summary.level + 1, level + 1):
                    summary.degraded_at[lv] = summary.n_resumed + k
                summary.level = level
            if summary.level >= LEVEL_EMPTY:
                # 1'. out of time: rows without decoding, sizes from the sample or PNG headers
                width, height = fallback_size(test_dir, image_id, sample_sizes)
                journal.add(image_id, width, height, "", None)
                bar.update(1)
                continue
            t0 = time.perf_counter()
            # 1. read RGBY and make the 512 px float image (done ahead by worker threads)
            item, t_read = next(images)
            summary.stage_seconds["read"] += t_read
            pred, error = "", item.error
            width, height = item.width, item.height
            if error is None:
                try:
                    # 2-8. segmentation, classifiers, Step 1/2, ensemble, RLE
                    pred = process_image(item, segmenter, models, config, opts, device, fp16, summary.level, timer, batch_size)
                except Exception as e:  # an image never costs the rest of the run
                    logger.exception("image %s failed", image_id)
                    error, pred = f"{type(e).__name__}: {e}", ""
            if not (width and height):
                width, height = fallback_size(test_dir, image_id, sample_sizes)
            if error:
                summary.failures[image_id] = error
                logger.warning("image %s: %s (empty row written)", image_id, error)
            # 9. the row, journaled at once so that a killed run resumes here
            journal.add(image_id, int(width), int(height), pred, error)
            budget.record(summary.level, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(failed=summary.n_failed)
    finally:
        bar.close()
        close = getattr(images, "close", None)
        if close is not None:
            close()

    for image_id, (_, _, _, err) in journal.rows.items():
        if err and image_id not in summary.failures:
            summary.failures[image_id] = err
    rows = {i: journal.rows[i][:3] for i in ids}
    with timer("write"):
        write_submission(rows, ids, out)
    journal.close(remove=True)
    summary.n_done = len(rows)
    summary.wall_seconds = time.perf_counter() - t_start
    return summary
