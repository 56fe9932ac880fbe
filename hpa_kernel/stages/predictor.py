"""The predictor: one image in, its cells and their per-class scores out.

:class:`Predictor` owns everything that decides how one image is scored: the segmenter,
the classifiers (each :class:`~hpa_kernel.stages.model.PuzzleCAM` carries its own
checkpoint meta), their ensemble weights, fp16, flip TTA, and the class-selection rule.
``predict(image, size) -> (labels, cell_ids, scores)``::

    segment -> per model: full-image forward -> Step 1 | cell crops -> Step 2
            -> Step 1 x Step 2 -> models -> top-N classes, min_confidence floor

Each rule exists once, here or in the stage it names: the top-N classes and the
``min_confidence`` floor in :func:`~hpa_kernel.stages.ensemble.select_top_classes`
(called once, after the ensemble), TTA's flips in :mod:`~hpa_kernel.stages.model`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.config import ClassifierConfig, KernelConfig, SegmentationConfig
from hpa_kernel.stages.ensemble import combine_models, combine_steps, select_top_classes
from hpa_kernel.stages.inputs import ImageInput
from hpa_kernel.stages.labels import present_ids
from hpa_kernel.stages.model import ClassMapModel, FoldGroup, classify_image, load_checkpoint
from hpa_kernel.stages.mpware import load_mpware
from hpa_kernel.stages.segmentation import Segmenter, create_segmenter
from hpa_kernel.stages.step1 import step1_scores
from hpa_kernel.stages.step2 import crop_batches, predict_crops

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CROP_SIZE", "Member", "Predictor", "ScoreDetail", "Timer", "crop_size_of", "load_classifier"]

#: Step 2 crop side when neither the manifest nor the checkpoint names one
DEFAULT_CROP_SIZE = 384


def crop_size_of(model: ClassMapModel, config: KernelConfig) -> tuple[int, str]:
    """The Step 2 crop side of one classifier and where it comes from.

    The one precedence rule: the manifest's ``crop_size`` when it sets one (an explicit
    choice for every classifier), else the checkpoint's (what the model was trained
    with), else :data:`DEFAULT_CROP_SIZE`. Returns ``(size, "manifest" | "checkpoint" |
    "default")``.
    """
    if config.crop_size is not None:
        return int(config.crop_size), "manifest"
    crop = model.data_config["crop_size"]
    if crop:
        return int(crop), "checkpoint"
    return DEFAULT_CROP_SIZE, "default"


def load_classifier(entry: ClassifierConfig, device: str = "cpu") -> ClassMapModel:
    """The model of one manifest classifier entry: its file read in its ``format``
    (:func:`~hpa_kernel.stages.model.load_checkpoint`, or
    :func:`~hpa_kernel.stages.mpware.load_mpware` for the team's files), several files as
    one :class:`~hpa_kernel.stages.model.FoldGroup`. Raises
    :class:`~hpa_kernel.stages.model.CheckpointError` naming the file that does not fit."""
    if entry.format == "mpware":
        models = [load_mpware(p, device, entry.backbone, entry.image_size, entry.crop_size) for p in entry.paths]
    else:
        models = [load_checkpoint(p, device=device)[0] for p in entry.paths]
    return models[0] if len(models) == 1 else FoldGroup(models)


class Timer(Protocol):
    """What :meth:`Predictor.predict` reports stage times to (``hpa_kernel.run.summary.StageTimer``)."""

    def __call__(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def add(self, name: str, seconds: float) -> None: ...


class _NoTimer:
    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        yield

    def add(self, name: str, seconds: float) -> None:
        pass


@dataclass
class Member:
    """One classifier of the ensemble and its weight."""

    model: ClassMapModel
    weight: float = 1.0
    #: Step 2 crop side (:func:`crop_size_of`; ``None``: worked out when scoring)
    crop_size: int | None = None
    #: the model's name in the per-cell export (``m<k>``, ``k`` = its place in the manifest)
    name: str = "m0"


@dataclass
class ScoreDetail:
    """What :meth:`Predictor.predict` gives besides its return value when asked (``detail=``).

    ``steps[name]`` is ``{"step1": (n, 19) | None, "step2": (n, 19) | None, "ens": (n, 19)}``
    for each model that ran on the image (in member order; a step that did not run is
    ``None``, a model left out by ``max_models`` is absent). Rows follow ``cell_ids``.
    ``image_probs[name]`` is the model's full-image ``(19,)`` probabilities (when its Step 1 ran).
    """

    steps: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)
    image_probs: dict[str, np.ndarray] = field(default_factory=dict)


class Predictor:
    """Segmenter + classifiers + the rules that turn them into per-cell scores.

    Args:
        segmenter: any :class:`~hpa_kernel.stages.segmentation.Segmenter`.
        members: the classifiers; none = every image gets no scores (cells still found).
        config: the manifest (``step1_weight``, ``step2_weight`` (numbers or per class),
            ``cam_norm``, ``top_classes``, ``min_confidence``, ``crop_size``: see
            :func:`crop_size_of`).
        device, fp16: where the classifiers run; fp16 autocast (CUDA only).
        tta: flip test-time augmentation (identity, horizontal, vertical).
        batch_size: Step 2 crop batch size (default: the manifest's).
        problems: parts of the manifest that could not be used (set by :meth:`from_config`).
    """

    def __init__(
        self,
        segmenter: Segmenter,
        members: list[Member],
        config: KernelConfig,
        device: str = "cpu",
        fp16: bool = False,
        tta: bool = False,
        batch_size: int | None = None,
        problems: list[str] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.members = members
        self.config = config
        self.device = device
        self.fp16 = fp16
        self.tta = tta
        self.batch_size = int(batch_size or config.batch_size)
        self.problems = list(problems or [])
        #: how many times Step 2 was cut short by a deadline (:meth:`score`)
        self.step2_cut = 0
        #: the segmenter in words (``"classic (fallback)"`` when the manifest's was unusable)
        self.segmenter_name = segmenter.name

    @classmethod
    def from_config(
        cls, config: KernelConfig, device: str = "cpu", fp16: bool = False, tta: bool = False,
        batch_size: int | None = None,
    ) -> "Predictor":
        """Build the manifest's segmenter and load its classifiers.

        Never raises for a bad file: unusable segmentation weights fall back to the
        weight-free ``classic`` segmenter, an unusable classifier is skipped; each is
        logged as an error and listed in :attr:`problems`.
        """
        problems: list[str] = []
        try:
            segmenter = create_segmenter(config.segmentation, device=device, fp16=fp16)
        except Exception as e:  # WeightFileError and anything torch raises
            msg = f"segmentation weights unusable ({e}); using the weight-free classic segmenter"
            logger.error(msg)
            problems.append(msg)
            segmenter = create_segmenter(SegmentationConfig(method="classic"), device=device, fp16=fp16)
        members = []
        for k, c in enumerate(config.classifiers):
            try:
                model = load_classifier(c, device=device)
            except Exception as e:  # CheckpointError and anything torch raises
                msg = f"classifier {c.path if len(c.paths) == 1 else c.name} skipped: {e}"
                logger.error(msg)
                problems.append(msg)
                continue
            crop, source = crop_size_of(model, config)
            logger.info("classifier m%d %s: input %s, Step 2 crops %d px (%s's crop_size)",
                        k, c.name, model.input_pipeline, crop, source)
            members.append(Member(model, c.weight, crop_size=crop, name=f"m{k}"))
        if not members:
            logger.error("no usable classifier in the manifest")
        predictor = cls(segmenter, members, config, device, fp16, tta, batch_size, problems)
        if segmenter.name != config.segmentation.method:
            predictor.segmenter_name += " (fallback)"
        return predictor

    def predict(
        self,
        image: ImageInput | np.ndarray,
        size: tuple[int, int],
        step2: bool = True,
        max_models: int | None = None,
        timer: Timer | None = None,
        detail: ScoreDetail | None = None,
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment and score one image.

        Args:
            image: the image as an :class:`~hpa_kernel.stages.inputs.ImageInput` (the raw
                image: each classifier is fed through its own input pipeline), or the
                ``(S, S, 4)`` float32 working pixels in [0, 1] alone (then only classifiers
                of the ``"hpa_kernel"`` pipeline can be fed).
            size: the original ``(width, height)``.
            step2: run Step 2 (if the manifest weighs it); ``False`` = Step 1 only.
            max_models: use only the first this many classifiers (``None``: all).
            timer: receives stage times (``segmentation``, ``seg_network``,
                ``inputs``, ``forward_full``, ``step1``, ``crops``, ``forward_crops``, ``ensemble``).
            detail: a :class:`ScoreDetail` to fill with the per-model Step 1, Step 2 and
                ensembled scores (for ``submit --save-cells``); ``None``: not kept.
            deadline: a ``time.perf_counter()`` time (the time budget's): a model's Step 2
                still running then stops between batches and the image is scored by Step 1
                for that model (logged, counted in :attr:`step2_cut`); ``None``: no limit.

        Returns:
            ``(labels (S, S) int32, cell_ids (n,), scores (n, 19) float32)``: after the
            class-selection rule, 0 = not predicted.
        """
        timer = timer if timer is not None else _NoTimer()
        image = ImageInput.of(image)
        net0 = self.segmenter.network_seconds
        t0 = time.perf_counter()
        labels = self.segmenter.segment(image.image[None], [size])[0].cells
        net = self.segmenter.network_seconds - net0
        timer.add("segmentation", time.perf_counter() - t0 - net)
        if net:  # the U-Net forwards apart from the post-processing
            timer.add("seg_network", net)
        cell_ids = present_ids(labels)
        return labels, cell_ids, self.score(image, labels, cell_ids, step2, max_models, timer, detail, deadline)

    def score(
        self,
        image: ImageInput | np.ndarray,
        labels: np.ndarray,
        cell_ids: np.ndarray,
        step2: bool = True,
        max_models: int | None = None,
        timer: Timer | None = None,
        detail: ScoreDetail | None = None,
        deadline: float | None = None,
    ) -> np.ndarray:
        """Per-cell, per-class scores ``(n, 19)`` of given cells: Step 1, Step 2, the
        ensemble and the class-selection rule (see :meth:`predict`; ``image``, ``detail``
        and ``deadline`` likewise; ``labels`` at the working size ``S``).

        Each model gets the pixels of its own input pipeline: at its ``image_size`` for the
        full image, at ``S`` for the cell crops (cut where the labels are); each
        ``(pipeline, size)`` is made once per image (:class:`~hpa_kernel.stages.inputs.ImageInput`).
        """
        timer = timer if timer is not None else _NoTimer()
        image = ImageInput.of(image)
        config = self.config
        n = len(cell_ids)
        members = self.members[:max_models] if max_models is not None else self.members
        if n == 0 or not members:
            return np.zeros((n, NUM_CLASSES), np.float32)
        use_step2 = config.use_step2 and step2
        use_step1 = config.use_step1 or not use_step2
        per_model = []
        for m in members:
            s1 = self._step1(m, image, labels, cell_ids, timer, detail) if use_step1 else None
            s2 = self._step2(m, image, labels, cell_ids, timer, deadline) if use_step2 else None
            if s1 is None and s2 is None:  # Step 2 cut short by the deadline: Step 1 instead
                s1 = self._step1(m, image, labels, cell_ids, timer, detail)
            with timer("ensemble"):
                per_model.append(combine_steps(s1, s2, config.step1_weight, config.step2_weight))
            if detail is not None:
                detail.steps[m.name] = {"step1": s1, "step2": s2, "ens": per_model[-1]}
        with timer("ensemble"):
            scores = combine_models(per_model, [m.weight for m in members])
            return select_top_classes(scores, top_n=config.top_classes, floor=config.min_confidence)

    def _step1(
        self, m: Member, image: ImageInput, labels: np.ndarray, cell_ids: np.ndarray, timer: Timer,
        detail: ScoreDetail | None,
    ) -> np.ndarray:
        """One model's Step 1: the full image through its pipeline, CAM ∩ cell."""
        with timer("inputs"):
            full = image.pixels(m.model.input_pipeline, m.model.data_config["image_size"] or labels.shape[0])
        with timer("forward_full"):
            probs, cams = classify_image(m.model, full, self.device, self.fp16, self.tta, self.config.cam_norm)
        if detail is not None:
            detail.image_probs[m.name] = probs
        with timer("step1"):
            return step1_scores(cams, probs, labels, cell_ids)

    def _step2(
        self, m: Member, image: ImageInput, labels: np.ndarray, cell_ids: np.ndarray, timer: Timer,
        deadline: float | None,
    ) -> np.ndarray | None:
        """One model's Step 2, cut and classified ``batch_size`` cells at a time (memory bounded
        by the batch, not the cell count); ``None`` when ``deadline`` (``time.perf_counter()``
        seconds) passes before the last batch."""
        with timer("inputs"):
            pixels = image.pixels(m.model.input_pipeline, labels.shape[0])
        crop = m.crop_size or crop_size_of(m.model, self.config)[0]
        batches = crop_batches(pixels, labels, cell_ids, crop, self.batch_size)
        out, done = [], 0
        while done < len(cell_ids):
            if deadline is not None and time.perf_counter() > deadline:
                logger.warning("Step 2 of %s cut after %d of %d cells: past the time budget's deadline; "
                               "Step 1 scores this image", m.name, done, len(cell_ids))
                self.step2_cut += 1
                return None
            with timer("crops"):
                batch = next(batches)
            with timer("forward_crops"):
                out.append(predict_crops(m.model, batch, batch_size=self.batch_size, device=self.device,
                                         fp16=self.fp16, tta=self.tta))
            done += len(batch)
        return np.concatenate(out) if out else np.zeros((0, m.model.num_classes), np.float32)
