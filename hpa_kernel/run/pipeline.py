"""The loop: every image of a Kaggle-layout folder through the stages, in pipeline order.

    read RGBY -> 512 px float -> Predictor (segment, classify, Step 1, Step 2, ensemble,
        class selection) -> masks to the original size -> RLE -> row -> journal

:func:`run` streams the images one at a time while worker threads decode the next ones
(:mod:`~hpa_kernel.run.prefetch`), journals every row so that an interrupted run resumes
(:mod:`~hpa_kernel.run.journal`), degrades to cheaper settings when a time budget would be
exceeded (:mod:`~hpa_kernel.run.budget`), and always writes a complete ``submission.csv``:
every sample ID gets a row; an image that fails at any stage gets an empty row and is
listed in the report (:mod:`~hpa_kernel.run.summary`). An ID that is not a safe file name
(:func:`~hpa_kernel.formats.images.is_safe_id`) is such a failure: no file is read or
written for it. A failed row is journaled with its error and done again on resume.

With ``--save-cells DIR`` each image's cells also go to the per-cell export
(:mod:`~hpa_kernel.formats.cells`) as the run goes: the label image and, per model, the
Step 1, Step 2 and ensembled scores besides the final ones. A shard (``--shard I/N``, and
so each ``--parallel`` process) writes ``DIR/shard-I-of-N`` (one writer per folder).
The export carries the fingerprint of the settings (:func:`cells_fingerprint`): the same
settings resume it (images already in the folder are skipped; images the journal has but
the export lacks are predicted again, so the export is complete), other settings are
refused at start-up (:class:`~hpa_kernel.formats.cells.ExportMismatch`) unless
``--overwrite-cells``. An export or overlay failure is logged and listed in the report's
warnings, never costs the image's row.

Start-up (:func:`check_start`, before any weight is loaded or image read): the run holds
the lock of ``--out`` (:func:`~hpa_kernel.run.lock.hold_output`) and then its journal to
the end; ``--save-overlays`` must name a folder that can be written; the export must not
be of other settings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpa_kernel.config import KernelConfig
from hpa_kernel.formats.atomic import check_folder
from hpa_kernel.formats.cells import CellsWriter, check_export
from hpa_kernel.formats.images import TEST_DIR, LoadedImage, fallback_size, id_file, load_image, read_test_set
from hpa_kernel.formats.overlay import save_overlay
from hpa_kernel.formats.rle import encode_label_image
from hpa_kernel.formats.submission import prediction_string, write_submission
from hpa_kernel.integrity import verify_files
from hpa_kernel.run.budget import LEVEL_EMPTY, LEVEL_NAMES, LEVEL_SETTINGS, Budget
from hpa_kernel.run.device import resolve_device
from hpa_kernel.run.journal import Journal, fingerprint, journal_path
from hpa_kernel.run.lock import hold_output
from hpa_kernel.run.options import RunOptions, select_ids
from hpa_kernel.run.prefetch import prefetch
from hpa_kernel.run.summary import RunSummary, StageTimer
from hpa_kernel.stages.inputs import ImageInput
from hpa_kernel.stages.predictor import Predictor, ScoreDetail

logger = logging.getLogger(__name__)

__all__ = ["run", "predict_row", "CellsExport", "OverlayExport", "NoUsableClassifier", "cells_folder",
           "cells_fingerprint", "check_start"]


class NoUsableClassifier(RuntimeError):
    """Not one classifier of the manifest could be loaded: the run stops before any image
    (``submit`` exits 2) instead of writing a file of empty rows."""


def cells_folder(save_cells: Path, shard: tuple[int, int] | None) -> Path:
    """Where a run writes its per-cell export: ``DIR``, or ``DIR/shard-I-of-N`` for a shard."""
    return Path(save_cells) / f"shard-{shard[0]}-of-{shard[1]}" if shard else Path(save_cells)


def cells_fingerprint(config: KernelConfig, opts: RunOptions) -> str:
    """The settings a per-cell export's scores come from: the journal's fingerprint
    (:func:`~hpa_kernel.run.journal.fingerprint`) without the ID list (an export grows
    image by image; another ``--max-images`` or shard only adds images)."""
    return fingerprint(config, (), Path(opts.data_dir), opts.tta, fp16=opts.fp16, max_pixels=opts.max_pixels)


def check_start(config: KernelConfig, opts: RunOptions, shards: int | None = None) -> None:
    """The start-up checks of the run's side outputs (``OSError``/``ValueError``, one line):
    ``--save-overlays`` names a folder that can be written (or created), and the
    ``--save-cells`` export (of each of ``shards`` shards, for a ``--parallel`` parent) is
    not of other settings unless ``--overwrite-cells``."""
    if opts.save_overlays is not None:
        try:
            check_folder(opts.save_overlays)
        except OSError as e:
            raise OSError(f"--save-overlays: {e}") from None
    if opts.save_cells is not None and not opts.overwrite_cells:
        fp = cells_fingerprint(config, opts)
        for shard in [(i, shards) for i in range(shards)] if shards else [opts.shard]:
            check_export(cells_folder(opts.save_cells, shard), fp)


class OverlayExport:
    """The run's ``--save-overlays`` folder. :meth:`write` never raises: a failure is logged
    and kept in :attr:`failures` (the image keeps its row)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.failures: dict[str, str] = {}

    def write(self, image_id: str, image, labels, cell_ids, scores) -> None:
        try:
            save_overlay(id_file(self.folder, image_id, ".png"), image, labels, cell_ids, scores)
        except Exception as e:  # the overlay never costs the row
            self.failures[image_id] = f"{type(e).__name__}: {e}"
            logger.error("image %s: overlay failed (%s); its row is still written", image_id, self.failures[image_id])


class CellsExport:
    """The run's per-cell export: one :class:`~hpa_kernel.formats.cells.CellsWriter`.

    :meth:`write` never raises: a failure (a bad ID -- the writer refuses one that cannot
    name a file --, a full disk) is logged and kept in :attr:`failures`.
    """

    def __init__(self, folder: Path, models: list[str], resume: bool, fingerprint: str | None = None,
                 overwrite: bool = False) -> None:
        self.writer = CellsWriter(folder, models=models, resume=resume, fingerprint=fingerprint, overwrite=overwrite)
        self.failures: dict[str, str] = {}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.writer

    def write(self, image_id: str, labels, size: tuple[int, int], cell_ids, scores, detail: ScoreDetail) -> None:
        try:
            self.writer.write_image(image_id, labels, size, cell_ids, scores, detail.steps)
        except Exception as e:  # the export never costs the row
            self.failures[image_id] = f"{type(e).__name__}: {e}"
            logger.error("image %s: per-cell export failed (%s); its row is still written", image_id, self.failures[image_id])

    def close(self) -> None:
        self.writer.close()


def predict_row(
    predictor: Predictor, item: LoadedImage, level: int, timer: StageTimer, overlays: OverlayExport | None,
    cells: CellsExport | None = None, deadline: float | None = None,
) -> str:
    """One decoded image's PredictionString: predict, masks to the original size, RLE
    (and its overlay and per-cell export when given: their failures never raise)."""
    detail = ScoreDetail() if cells is not None else None
    image = ImageInput(item.rgby, image=item.image)  # each model's pixels from the raw image, made once
    labels, cell_ids, scores = predictor.predict(
        image, (item.width, item.height), timer=timer, detail=detail, deadline=deadline, **LEVEL_SETTINGS[level]
    )
    written = cell_ids[scores.max(axis=1) > 0]  # cells with something to write
    with timer("rle"):
        rles = encode_label_image(labels, item.width, item.height, cell_ids=written)
        pred = prediction_string(rles, cell_ids, scores)
    if overlays is not None:
        with timer("overlay"):
            overlays.write(item.id, item.image, labels, cell_ids, scores)
    if cells is not None:  # last: a row that failed above is not exported either
        with timer("save_cells"):
            cells.write(item.id, labels, (item.width, item.height), cell_ids, scores, detail)
    return pred


def run(config: KernelConfig, opts: RunOptions) -> RunSummary:
    """Run the kernel over ``opts.data_dir`` and write ``opts.out``; returns the report.

    The lock of ``opts.out`` and its journal are held from before the weights are loaded to
    the end: a second run on the same ``--out`` raises
    :class:`~hpa_kernel.run.lock.OutputBusy`. :func:`check_start` runs first.
    """
    t_start = time.perf_counter()
    with hold_output(opts.out) as lock_warning:
        check_start(config, opts)
        return _journaled(config, opts, t_start, [lock_warning] if lock_warning else [])


def _journaled(config: KernelConfig, opts: RunOptions, t_start: float, warnings: list[str]) -> RunSummary:
    """:func:`run` once ``--out`` is locked: the IDs, the journal, then the images."""
    out, data_dir = Path(opts.out), Path(opts.data_dir)

    # 0. the IDs, the weights (integrity, device), the predictor
    all_ids, sample = read_test_set(data_dir)
    ids = select_ids(all_ids, opts.shard, opts.max_images)
    sample_sizes = sample.sizes if sample else {}
    if sample and sample.duplicates:
        dups = sorted(set(sample.duplicates))
        warnings.append(f"sample_submission.csv lists {len(dups)} duplicate ID(s), each written once: " + ", ".join(dups[:5]))
    if sample and sample.repeated_headers:
        lines = sample.repeated_headers
        warnings.append(f"sample_submission.csv repeats its header line at line(s) "
                        f"{', '.join(map(str, lines[:5]))}: skipped, not an ID")
    journal = Journal(journal_path(out), fingerprint(config, ids, data_dir, opts.tta, fp16=opts.fp16,
                                                     max_pixels=opts.max_pixels), opts.resume)
    if journal.warning:
        warnings.append(journal.warning)
    try:
        state = _start(config, opts, t_start, sample_sizes, warnings, journal)
        todo = _todo(ids, journal, state.cells)
        state.n_resumed = len(ids) - len(todo)
        _loop(state, todo, len(ids))  # every row journaled at once, so that a killed run resumes
        return _finish(state, ids, t_start)
    finally:
        journal.close(remove=not journal.rows)  # a run that did nothing leaves no journal


@dataclass
class _RunState:
    """What a run carries from image to image: its stages, exports, budget, tallies."""

    opts: RunOptions
    predictor: Predictor
    journal: Journal
    sample_sizes: dict[str, tuple[int, int]]
    warnings: list[str]
    timer: StageTimer
    budget: Budget
    device: str  # as the report names it: "cuda:0 fp16"
    test_dir: Path
    image_size: int
    cells: CellsExport | None = None
    overlays: OverlayExport | None = None
    level: int = 0
    degraded_at: dict[int, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    n_cut: int = 0
    n_resumed: int = 0

    def read(self, image_id: str) -> tuple[LoadedImage, float]:
        """One image decoded (in a read-ahead thread), and the seconds it took."""
        t0 = time.perf_counter()
        item = load_image(self.test_dir, image_id, size=self.image_size, max_pixels=self.opts.max_pixels)
        return item, time.perf_counter() - t0

    def pace(self, done: int, left: int) -> bool:
        """The time budget before the next image (``done`` of this run's so far, ``left`` to
        go): switch to cheaper settings when needed; ``True`` when out of time."""
        new_level = self.budget.level(self.level, left, time.perf_counter())
        if new_level > self.level:
            logger.warning("time budget: switching to %s", LEVEL_NAMES[new_level])
            self.degraded_at.update({lv: self.n_resumed + done for lv in range(self.level + 1, new_level + 1)})
            self.level = new_level
        return self.level >= LEVEL_EMPTY

    def cut(self, image_id: str) -> None:
        """Out of time: the row without decoding, its size from the sample or the PNG header."""
        self.journal.add(image_id, *fallback_size(self.test_dir, image_id, self.sample_sizes), "", None)
        self.n_cut += 1

    def process(self, item: LoadedImage) -> tuple[int, int, str, str | None]:
        """One decoded image's row ``(width, height, predstring, error)``; a failure at any
        stage gives an empty predstring and its error (logged), never an exception."""
        self.warnings += item.warnings
        pred, error = "", item.error
        said = self.sample_sizes.get(item.id, (0, 0))  # (0, 0): the sample gives no size
        if error is None and min(said) > 0 and said != (item.width, item.height):
            # the row must have the sample's size (the file is checked against it)
            error = f"sample says {said[0]}x{said[1]}, PNG is {item.width}x{item.height}"
        if error is None:
            try:
                # 2-8. segmentation, classifiers, Step 1/2, ensemble, class selection, RLE
                pred = predict_row(self.predictor, item, self.level, self.timer, self.overlays, self.cells,
                                   self.budget.deadline)
            except Exception as e:  # an image never costs the rest of the run
                logger.exception("image %s failed", item.id)
                error, pred = f"{type(e).__name__}: {e}", ""
        width, height = (item.width, item.height) if item.width and item.height and not min(said) > 0 else (
            fallback_size(self.test_dir, item.id, self.sample_sizes)  # the sample's size where it has one
        )
        if error:
            self.failures[item.id] = error
            logger.warning("image %s: %s (empty row written)", item.id, error)
        return int(width), int(height), pred, error


def _start(config: KernelConfig, opts: RunOptions, t_start: float, sample_sizes: dict[str, tuple[int, int]],
           warnings: list[str], journal: Journal) -> _RunState:
    """The weights checked, the device, the predictor (:class:`NoUsableClassifier` when it
    has no classifier), the exports and the budget."""
    verify_files(config, check_hash=opts.verify_weights)
    device, device_warning = resolve_device(opts.device)
    if device_warning:
        warnings.append(device_warning)
    cuda = device.startswith("cuda")
    fp16 = cuda if opts.fp16 is None else bool(opts.fp16)
    timer = StageTimer(cuda=cuda)
    with timer("load_weights"):
        predictor = Predictor.from_config(config, device, fp16, tta=opts.tta, batch_size=opts.batch_size)
    warnings += predictor.problems
    if not predictor.members:  # every row would be empty: a failed run, not a zero score
        raise NoUsableClassifier("no usable classifier, nothing was run: " + "; ".join(
            predictor.problems or ["the manifest names none"]))
    return _RunState(
        opts, predictor, journal, sample_sizes, warnings, timer, Budget(opts.time_budget, t_start),
        device + (" fp16" if fp16 and cuda else ""), Path(opts.data_dir) / TEST_DIR, config.image_size,
        cells=_open_cells(config, opts, [m.name for m in predictor.members], warnings),
        overlays=OverlayExport(opts.save_overlays) if opts.save_overlays is not None else None)


def _loop(state: _RunState, todo: list[str], n_ids: int) -> None:
    """Every image of ``todo`` (read ahead by worker threads) to its journaled row."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n_ids, initial=state.n_resumed, desc="hpa_kernel", unit="img", disable=not state.opts.progress)
    images = prefetch(todo, state.read, workers=state.opts.workers)  # yields in the order of todo
    try:
        for k, image_id in enumerate(todo):
            if state.pace(k, len(todo) - k):
                state.cut(image_id)
                bar.update(1)
                continue
            t0 = time.perf_counter()
            # 1. read RGBY and make the 512 px float image (done ahead by worker threads)
            item, t_read = next(images)
            if item.id != image_id:  # prefetch yields in input order; skipped rows never reach it
                raise RuntimeError(f"read-ahead out of step: got {item.id}, expected {image_id}")
            state.timer.add("read", t_read)
            state.journal.add(image_id, *state.process(item))  # 9. the row
            state.budget.record(state.level, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(failed=len(state.failures))
    finally:
        bar.close()
        images.close()
        if state.cells is not None:
            state.cells.close()


def _finish(state: _RunState, ids: list[str], t_start: float) -> RunSummary:
    """The report (with the exports' and the journal's failures) and the submission, every
    ID from the journal (then removed)."""
    for what, export in (("per-cell export", state.cells), ("overlay", state.overlays)):
        if export is not None and export.failures:
            bad = sorted(export.failures)
            state.warnings.append(f"{what} failed for {len(bad)} image(s) (rows written): " + ", ".join(bad[:5])
                                  + f" ({export.failures[bad[0]]})")
    journal, failures = state.journal, state.failures
    for image_id, (_, _, _, err) in journal.rows.items():
        if err and image_id not in failures:
            failures[image_id] = err
    rows = {i: journal.rows[i][:3] for i in ids}
    with state.timer("write"):
        write_submission(rows, ids, Path(state.opts.out))
    journal.close(remove=True)
    return RunSummary(
        out=Path(state.opts.out), n_images=len(ids), n_done=len(rows), n_resumed=state.n_resumed,
        failures=failures, warnings=state.warnings, stage_seconds=dict(state.timer.totals),
        degraded_at=state.degraded_at, wall_seconds=time.perf_counter() - t_start,
        device=state.device, n_models=len(state.predictor.members),
        segmenter=state.predictor.segmenter_name, component_failures=list(state.predictor.problems),
        n_budget_cut=state.n_cut, time_budget=state.opts.time_budget,
    )


def _open_cells(config: KernelConfig, opts: RunOptions, models: list[str], warnings: list[str]) -> CellsExport | None:
    """The run's per-cell export, or ``None`` (not asked for, or its folder unusable: the
    reason goes to ``warnings``; the submission is still written)."""
    if opts.save_cells is None:
        return None
    folder = cells_folder(opts.save_cells, opts.shard)
    try:
        return CellsExport(folder, models, resume=opts.resume, fingerprint=cells_fingerprint(config, opts),
                           overwrite=opts.overwrite_cells)
    except Exception as e:  # a bad folder never costs the submission
        logger.error("per-cell export to %s disabled: %s", folder, e)
        warnings.append(f"per-cell export to {folder} disabled: {type(e).__name__}: {e}")
        return None


def _todo(ids: list[str], journal: Journal, cells: CellsExport | None) -> list[str]:
    """The IDs to predict: those without a good journal row (failed rows are done again)
    and, with an export, those the journal has but the export lacks (predicted again so
    that the export is complete, e.g. a resume with ``--save-cells`` added)."""
    todo = [i for i in ids if not journal.done(i) or (cells is not None and i not in cells)]
    n_retry = sum(1 for i in todo if i in journal.rows and not journal.done(i))
    n_export = sum(1 for i in todo if journal.done(i))
    if len(todo) < len(ids) or n_retry or n_export:
        logger.info("resuming: %d of %d images already done, %d failed one(s) to retry, %d predicted again "
                    "for the per-cell export, which lacks them", len(ids) - len(todo), len(ids), n_retry, n_export)
    return todo
