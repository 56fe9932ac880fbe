"""The run's report (:class:`RunSummary`) and its stage timing (:class:`StageTimer`).

The summary is written once, when the run ends, from what the loop and the set-up found;
it is not the loop's state. ``format()`` is what the CLI prints.

Its size does not grow with the number of failures: failures that share a reason (the same
message but for the image's own ID) are one line with their count and the first IDs
(:func:`failure_lines`, at most :data:`MAX_REASONS` reasons), and an ID or a reason never
splits a line (:func:`one_line`). The log obeys the same rule (:class:`RepeatFilter`: the
first :data:`REPEATS_LOGGED` records of each message form, then one line saying the rest
are counted in the summary).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hpa_kernel import __version__
from hpa_kernel.run.budget import LEVEL_NAMES

__all__ = ["RunSummary", "StageTimer", "one_line", "failure_lines", "RepeatFilter", "log_to_stderr", "MAX_REASONS",
           "REPEATS_LOGGED"]

#: Failure reasons the summary lists one by one; the others are counted on one line.
MAX_REASONS = 20
#: IDs named per failure reason in the summary.
IDS_PER_REASON = 5
#: Records of one message form (the same logger and format string) logged at WARNING or
#: above before the rest are left to the summary.
REPEATS_LOGGED = 10


def one_line(text: object) -> str:
    """``str(text)`` with its non-printable characters escaped (a newline becomes ``\\n``):
    an ID or a reason never splits a line of the summary or the log."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def failure_lines(failures: dict[str, str], max_reasons: int = MAX_REASONS) -> list[str]:
    """The summary's ``failed:`` lines: one per reason, the images whose reason is the same
    but for their own ID counted together (``failed: 3 images with the same reason, e.g.
    a, b, c: <a's reason>``), one image alone as ``failed: <ID>: <reason>``; past
    ``max_reasons`` reasons one line counts the rest."""
    groups: dict[str, list[str]] = {}
    for image_id, reason in failures.items():
        groups.setdefault(reason.replace(image_id, "\0") if image_id else reason, []).append(image_id)
    lines = []
    for ids in list(groups.values())[:max_reasons]:
        reason = one_line(failures[ids[0]])
        if len(ids) == 1:
            lines.append(f"failed: {one_line(ids[0])}: {reason}")
        else:
            more = ", ..." if len(ids) > IDS_PER_REASON else ""
            eg = ", ".join(one_line(i) for i in ids[:IDS_PER_REASON]) + more
            lines.append(f"failed: {len(ids)} images with the same reason, e.g. {eg}: {reason}")
    rest = list(groups.values())[max_reasons:]
    if rest:
        lines.append(f"failed: {sum(map(len, rest))} more image(s) with {len(rest)} other reason(s), "
                     f"e.g. {one_line(rest[0][0])}: {one_line(failures[rest[0][0]])}")
    return lines


class RepeatFilter(logging.Filter):
    """A handler filter that keeps the log's size from growing with repeated faults.

    Every record's message is made one line (:func:`one_line`; a traceback still follows
    it). Of the records at WARNING or above with the same logger and format string (``image
    %s: %s (empty row written)`` for every failed image), the first ``limit`` pass; the next
    one is replaced by a line saying that the rest are not logged (the summary counts them);
    the others are dropped. DEBUG and INFO records always pass (``-v`` shows everything).
    """

    def __init__(self, limit: int = REPEATS_LOGGED) -> None:
        super().__init__()
        self.limit = limit
        self.seen: dict[tuple[str, str], int] = defaultdict(int)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))  # the format string: the same for every image
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = one_line(message), None
        if record.levelno < logging.WARNING:
            return True
        self.seen[key] += 1
        n = self.seen[key]
        if n == self.limit + 1:
            record.msg, record.args = (f"... more like this are not logged (at most {self.limit} of a kind; "
                                       "the summary counts every failure): " + one_line(record.getMessage())), None
            record.exc_info = record.exc_text = None
            return True
        return n <= self.limit



def log_to_stderr(level: int, fmt: str, datefmt: str | None = None) -> None:
    """The command lines' logging: as ``logging.basicConfig(level=, format=, datefmt=)`` (so
    nothing changes where the root logger already has handlers, e.g. under pytest), with a
    :class:`RepeatFilter` on the stderr handler."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    handler.addFilter(RepeatFilter())
    root.addHandler(handler)
    root.setLevel(level)


@dataclass
class RunSummary:
    """What a run did: counts, failures, warnings, stage times, degradations."""

    out: Path
    n_images: int = 0
    n_done: int = 0
    n_resumed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    degraded_at: dict[int, int] = field(default_factory=dict)  # level -> images done before
    wall_seconds: float = 0.0
    device: str = "cpu"
    n_models: int = 0
    segmenter: str = ""
    #: parts of the manifest that could not be used (a classifier file, the segmentation
    #: weights): the file is complete, but not what was asked for
    component_failures: list[str] = field(default_factory=list)
    #: rows the time budget cut: written empty without predicting (not failures, not done)
    n_budget_cut: int = 0
    #: the run's ``--time-budget`` in seconds (``None``: none)
    time_budget: float | None = None

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        """Every image went through with every model of the manifest (a row the time budget
        cut did not go through)."""
        return not self.failures and not self.component_failures and not self.n_budget_cut

    def format(self) -> str:
        """A readable multi-line summary (printed by the CLI)."""
        lines = [
            f"hpa_kernel {__version__}: {self.n_done}/{self.n_images} images"
            f" ({self.n_resumed} resumed), {self.n_failed} failed,"
            + (f" {self.n_budget_cut} cut by the time budget (empty rows)," if self.n_budget_cut else "")
            + f" device {self.device},"
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
        if self.time_budget is not None:
            lines.append(f"time budget {self.time_budget:g} s: used {self.wall_seconds:.1f} s "
                         f"({100 * self.wall_seconds / self.time_budget:.0f} %)"
                         + (f"; {self.n_budget_cut} image(s) not predicted, written empty" if self.n_budget_cut else ""))
        for w in self.warnings:
            lines.append(f"warning: {one_line(w)}")
        lines += failure_lines(self.failures)
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)


class StageTimer:
    """Wall time per stage name, in first-use order (synchronising CUDA when used)."""

    def __init__(self, cuda: bool = False):
        self.totals: dict[str, float] = defaultdict(float)
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

    def add(self, name: str, seconds: float) -> None:
        """Time measured elsewhere (e.g. the read-ahead threads, the U-Net forwards)."""
        self.totals[name] += seconds
