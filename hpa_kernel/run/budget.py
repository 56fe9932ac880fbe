"""The time-budget policy: how much of the method each image still gets.

Levels, cheapest last; :data:`LEVEL_SETTINGS` says what each means for
:meth:`hpa_kernel.stages.predictor.Predictor.predict`. :class:`Budget` measures the time
per image at each level and takes the next cheaper level when the projected end would
pass 95 % of the budget; at :data:`LEVEL_EMPTY` the remaining rows are written empty
without decoding.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["LEVEL_FULL", "LEVEL_STEP1_ONLY", "LEVEL_ONE_MODEL", "LEVEL_EMPTY", "LEVEL_NAMES", "LEVEL_SETTINGS", "Budget"]

LEVEL_FULL, LEVEL_STEP1_ONLY, LEVEL_ONE_MODEL, LEVEL_EMPTY = 0, 1, 2, 3
LEVEL_NAMES = {
    LEVEL_FULL: "full (Step 1 + Step 2, all models)",
    LEVEL_STEP1_ONLY: "Step 1 only",
    LEVEL_ONE_MODEL: "Step 1 only, first model only",
    LEVEL_EMPTY: "no prediction (empty rows) for the remaining images",
}
#: Predictor.predict keyword arguments per level (LEVEL_EMPTY predicts nothing)
LEVEL_SETTINGS: dict[int, dict[str, Any]] = {
    LEVEL_FULL: {"step2": True, "max_models": None},
    LEVEL_STEP1_ONLY: {"step2": False, "max_models": None},
    LEVEL_ONE_MODEL: {"step2": False, "max_models": 1},
}


class Budget:
    """Chooses the degradation level so that the projected end stays within the budget.

    The rate of each level is measured on the images done at that level; a level not
    yet tried is assumed to cost ``COST[level]`` times the full level's rate. When
    ``elapsed + remaining * rate(level)`` passes 95 % of the budget, the next cheaper
    level is taken; at :data:`LEVEL_EMPTY` the remaining rows are written empty.
    ``seconds=None``: no budget, always :data:`LEVEL_FULL`.
    """

    COST = {LEVEL_FULL: 1.0, LEVEL_STEP1_ONLY: 0.6, LEVEL_ONE_MODEL: 0.45, LEVEL_EMPTY: 0.0}
    MARGIN = 0.95

    def __init__(self, seconds: float | None, start: float):
        self.seconds = seconds
        self.start = start
        self.spent: dict[int, list[float]] = defaultdict(list)

    @property
    def deadline(self) -> float | None:
        """When the budget's margin runs out (``perf_counter`` seconds; ``None``: no budget):
        a Step 2 still running then is cut short (``Predictor.predict(deadline=...)``)."""
        return None if self.seconds is None else self.start + self.seconds * self.MARGIN

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
        """The level for the next image, never cheaper-to-dearer: ``>= current``."""
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
