"""The run's report (:class:`RunSummary`) and its stage timing (:class:`StageTimer`).

The summary is written once, when the run ends, from what the loop and the set-up found;
it is not the loop's state. ``format()`` is what the CLI prints.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hpa_kernel import __version__
from hpa_kernel.run.budget import LEVEL_NAMES

__all__ = ["RunSummary", "StageTimer"]


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
            lines.append(f"warning: {w}")
        for image_id, reason in self.failures.items():
            lines.append(f"failed: {image_id}: {reason}")
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
