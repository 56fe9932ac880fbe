"""Merge several pipelines' predictions by cell into one submission (``python -m hpa_kernel.team_merge``).

Inputs are Kaggle submissions (any pipeline's ``submission.csv``) or per-cell export
folders (``submit --save-cells DIR``, :mod:`hpa_kernel.formats.cells`). Per image every
input's cells become one label image at the original size (a submission: its distinct
mask strings decoded once, :func:`hpa_kernel.formats.submission_cells.row_cells`; an export: its
label PNG scaled up with nearest neighbour, as the pipeline's RLE does), the cells are
matched and their scores combined by :func:`hpa_kernel.stages.cellmatch.merge_cells`, and the
row is written with each output cell's mask string taken from the input that owns it
(the reference's strings are reused byte for byte; an export's cells are encoded with
:func:`hpa_kernel.formats.rle.encode_label_image`).

An input's fault on one image (a missing ID, another size, a malformed row: another number
of fields, a size that is not an integer, an ID on several rows) is logged and that input
counts as having no cells there; the summary counts each fault per input with the first
IDs; every sample ID gets its row. ``--out`` is checked before any input is read
(:func:`~hpa_kernel.formats.submission.prepare_output`: not a folder, not the sample or an
input, writable), and so is the sample (its sizes bound every image's arrays). Inputs that
share no image ID (the parts of one sharded run) are refused: :func:`refuse_shard_parts`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hpa_kernel.stages.cellmatch import MEANS, UNMATCHED, RankTable, merge_cells
from hpa_kernel.stages.ensemble import check_weights
from hpa_kernel.formats.cells import read_cells, read_labels, scores as table_scores
from hpa_kernel.classes import NUM_CLASSES
from hpa_kernel.formats.images import DEFAULT_MAX_PIXELS, read_sample
from hpa_kernel.formats.rle import encode_label_image
from hpa_kernel.stages.labels import resize_labels
from hpa_kernel.formats.submission import (prediction_string, prepare_output, read_submission_rows, sample_size_problems,
                                           validate_submission, write_submission)
from hpa_kernel.formats.submission_cells import row_cells, row_scores

__all__ = ["MergeOptions", "ImageCells", "SubmissionInput", "CellsInput", "open_input", "refuse_shard_parts", "merge_row", "merge_inputs", "MergeSummary"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeOptions:
    """How to merge; validated by :meth:`check` (``ValueError`` naming the bad field)."""

    weights: tuple[float, ...] | None = None  # one per input; default all 1
    reference: int = 0
    iou: float = 0.5
    unmatched: str = "zero"
    mean: str = "weighted"

    def check(self, n_inputs: int) -> "MergeOptions":
        if n_inputs < 1:
            raise ValueError("inputs: need at least one")
        if self.weights is not None:
            check_weights(self.weights, n_inputs)
        if not 0 <= self.reference < n_inputs:
            raise ValueError(f"reference: must be in 0..{n_inputs - 1}, got {self.reference}")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"iou: must be in (0, 1], got {self.iou}")
        if self.unmatched not in UNMATCHED:
            raise ValueError(f"unmatched: must be one of {', '.join(UNMATCHED)}, got {self.unmatched!r}")
        if self.mean not in MEANS:
            raise ValueError(f"mean: must be one of {', '.join(MEANS)}, got {self.mean!r}")
        return self


@dataclass
class ImageCells:
    """One input's cells on one image: cell ``i`` is label ``i + 1`` of ``labels``."""

    labels: np.ndarray  # (height, width) int
    scores: np.ndarray  # (n, 19)
    areas: np.ndarray | None  # own areas (None: the label counts)
    masks: Callable[[np.ndarray], list[str]]  # cell indices -> mask strings


def _empty(width: int, height: int) -> ImageCells:
    return ImageCells(np.zeros((height, width), np.int32), np.zeros((0, NUM_CLASSES)), np.zeros(0, np.int64),
                      lambda idx: [])


class SubmissionInput:
    """A Kaggle submission CSV as a merge input."""

    kind = "submission"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows, self.bad_rows = read_submission_rows(self.path)  # a bad row costs only its image

    def ids(self) -> set[str]:
        return set(self.rows) | set(self.bad_rows)

    def all_scores(self):
        """Every row's ``(n, 19)`` scores (no mask decoding), for a rank mean."""
        for image_id, (_, _, text) in self.rows.items():
            try:
                yield row_scores(text)[1]
            except ValueError:
                continue  # reported when the image is merged

    def cells(self, image_id: str, width: int, height: int) -> ImageCells:
        if image_id in self.bad_rows:
            raise ValueError(f"malformed row: {self.bad_rows[image_id]}")
        w, h, text = self.rows[image_id]
        if (w, h) != (width, height):
            raise ValueError(f"size {w}x{h} differs from the sample's {width}x{height}")
        c = row_cells(text, width, height)
        return ImageCells(c.labels, c.scores, c.areas, lambda idx, m=c.masks: [m[i] for i in idx])


class CellsInput:
    """A per-cell export folder as a merge input; its final ``score_cc`` columns are used."""

    kind = "cells"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.table = read_cells(self.folder)
        self.sizes = {r.ID: (int(r.ImageWidth), int(r.ImageHeight)) for r in self.table.images.itertuples()}
        self.groups = {k: v for k, v in self.table.cells.groupby("ID", sort=False)}

    def ids(self) -> set[str]:
        return set(self.sizes)

    def all_scores(self):
        yield table_scores(self.table.cells)

    def cells(self, image_id: str, width: int, height: int) -> ImageCells:
        if self.sizes[image_id] != (width, height):
            w, h = self.sizes[image_id]
            raise ValueError(f"size {w}x{h} differs from the sample's {width}x{height}")
        rows = self.groups.get(image_id)
        if rows is None or rows.empty:
            return _empty(width, height)
        small = read_labels(self.folder, image_id)
        ids = rows["cell_id"].to_numpy(np.int64)
        lut = np.zeros(max(int(small.max()), int(ids.max())) + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        labels = lut[resize_labels(small, width, height)]

        def masks(idx: np.ndarray) -> list[str]:
            rles = encode_label_image(small, width, height, cell_ids=ids[idx])
            return [rles.get(int(i), "") for i in ids[idx]]  # "": no pixel at this size

        return ImageCells(labels, table_scores(rows).astype(np.float64), None, masks)


def open_input(path: str | os.PathLike) -> SubmissionInput | CellsInput:
    """A folder is a per-cell export, a file a submission CSV; ``ValueError`` otherwise."""
    p = Path(path)
    if p.is_dir():
        return CellsInput(p)
    if p.is_file():
        return SubmissionInput(p)
    raise ValueError(f"input {p} does not exist")


def refuse_shard_parts(inputs: Sequence[str | os.PathLike], ids: Sequence[set[str]]) -> None:
    """``ValueError`` when two or more inputs, none empty, share no image ID at all: they are
    the disjoint parts of one sharded run, which merging by cell would leave half empty;
    they are joined by ``python -m hpa_kernel.submit merge``."""
    if len(ids) < 2 or not all(ids) or sum(len(i) for i in ids) != len(set().union(*ids)):
        return
    raise ValueError(f"inputs {', '.join(map(str, inputs))} share no image ID: they look like the parts of one "
                     "sharded run; join them with python -m hpa_kernel.submit merge, then merge the result by cell")


def merge_row(cells: Sequence[ImageCells], weights: Sequence[float], opts: MergeOptions,
              rank_tables: Sequence[RankTable] | None = None) -> str:
    """One image: the merged PredictionString of the inputs' cells."""
    scores = [c.scores if rank_tables is None else rank_tables[j].transform(c.scores) for j, c in enumerate(cells)]
    merged = merge_cells([c.labels for c in cells], scores, weights, opts.reference, opts.iou, opts.unmatched,
                         areas=[c.areas for c in cells])
    n = merged.source.size
    if n == 0:
        return ""
    strings: list[str] = [""] * n
    for j in np.unique(merged.source).tolist():  # one call per owning input
        rows = np.flatnonzero(merged.source == j)
        for r, s in zip(rows.tolist(), cells[j].masks(merged.cell[rows])):
            strings[r] = s
    rles = {i: s for i, s in enumerate(strings) if s}
    return prediction_string(rles, np.arange(n), merged.scores)


@dataclass
class MergeSummary:
    rows: int = 0
    cells: int = 0
    faults: Counter = field(default_factory=Counter)  # (input index, reason) -> images
    examples: dict = field(default_factory=dict)  # (input index, reason) -> first IDs (with detail)
    problems: list[str] = field(default_factory=list)  # validator's findings on the output

    def fault(self, j: int, image_id: str, message: str) -> None:
        """Input ``j`` counts as no cells on ``image_id``: ``message`` is ``reason[: detail]``."""
        reason = message.split(":")[0][:60]
        self.faults[(j, reason)] += 1
        seen = self.examples.setdefault((j, reason), [])
        if len(seen) < 3:
            seen.append(ascii(image_id) + (f" ({message[len(reason) + 1:].strip()})" if ":" in message else ""))

    def format(self) -> str:
        lines = [f"merged {self.rows} row(s), {self.cells} cell(s)"]
        for (j, reason), k in sorted(self.faults.items()):
            eg = self.examples.get((j, reason))
            lines.append(f"input {j}: {reason} on {k} image(s) (counted as no cells)" + (f", e.g. {', '.join(eg)}" if eg else ""))
        lines += [f"output problem: {p}" for p in self.problems[:10]]
        return "\n".join(lines)


def merge_inputs(
    inputs: Sequence[str | os.PathLike],
    sample: str | os.PathLike,
    out: str | os.PathLike,
    opts: MergeOptions = MergeOptions(),
    progress: bool = True,
) -> MergeSummary:
    """Merge ``inputs`` (submission CSVs / export folders) into the submission ``out``.

    Every sample ID gets a row, in the sample's order; ``out`` is written atomically and
    then validated against ``sample`` (``MergeSummary.problems``). ``ValueError`` (one
    line) for bad options, an ``--out`` that cannot be written, a missing sample or an unreadable input.
    """
    from tqdm.auto import tqdm

    opts.check(len(inputs))
    if not Path(sample).is_file():
        raise ValueError(f"sample {sample} does not exist")
    try:  # before any input is read: a folder, the sample, an input, a read-only place
        prepare_output(out, [sample, *inputs])
    except OSError as e:
        raise ValueError(f"--out: {e}") from None
    smp = read_sample(sample)
    bad = sample_size_problems(smp.sizes)
    if bad:
        raise ValueError(f"sample {sample}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    weights = list(opts.weights) if opts.weights is not None else [1.0] * len(inputs)
    logger.info("merging %d input(s): weights %s, reference %d, iou >= %g, unmatched %s, %s mean",
                len(inputs), weights, opts.reference, opts.iou, opts.unmatched, opts.mean)
    sources = []
    for p in inputs:
        try:
            sources.append(open_input(p))
        except ValueError as e:
            raise ValueError(f"input {p}: {e}") from None
        logger.info("input %d: %s (%s, %d image(s))", len(sources) - 1, p, sources[-1].kind, len(sources[-1].ids()))
    refuse_shard_parts(inputs, [s.ids() for s in sources])
    tables = [RankTable.fit(s.all_scores()) for s in sources] if opts.mean == "rank" else None

    summary = MergeSummary()
    rows: dict[str, tuple[int, int, str]] = {}
    for image_id in tqdm(smp.ids, desc="merge", unit="img", disable=not progress):
        width, height = smp.sizes[image_id]
        if not (width and height):
            ref = sources[opts.reference]
            size = ref.rows.get(image_id, (0, 0, ""))[:2] if ref.kind == "submission" else ref.sizes.get(image_id, (0, 0))
            width, height = size
        if not (width > 0 and height > 0) or width * height > DEFAULT_MAX_PIXELS:  # never the row's claim past the cap
            summary.fault(opts.reference, image_id, "no image size" if not (width > 0 and height > 0)
                          else f"size over the {DEFAULT_MAX_PIXELS}-pixel cap: {width}x{height}")
            rows[image_id] = (width, height, "")
            continue
        cells = []
        for j, s in enumerate(sources):
            if image_id not in s.ids():
                summary.fault(j, image_id, "ID missing")
                cells.append(_empty(width, height))
                continue
            try:
                cells.append(s.cells(image_id, width, height))
            except ValueError as e:
                logger.warning("input %d, image %a: %s; counted as no cells", j, image_id, e)
                summary.fault(j, image_id, str(e))
                cells.append(_empty(width, height))
        text = merge_row(cells, weights, opts, tables)
        rows[image_id] = (width, height, text)
        summary.cells += len(set(text.split()[2::3]))
    write_submission(rows, smp.ids, out)
    summary.rows = len(smp.ids)
    summary.problems = validate_submission(out, sample)
    for (j, reason), k in summary.faults.items():
        logger.warning("input %d: %s on %d image(s)", j, reason, k)
    return summary
