"""Puzzle-CAM siamese forward: tile the batch 2x2, run the tiles, stitch their class maps.

``tile`` / ``merge`` are exact inverses of each other for any tensor whose height and
width divide by ``grid``; :class:`PuzzleSiamese` wraps a :class:`hpa_kernel.stages.model.PuzzleCAM`
so one ``forward`` call (what DistributedDataParallel hooks) does both passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

__all__ = ["tile", "merge", "PuzzleSiamese"]


def tile(x: torch.Tensor, grid: int = 2) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` into ``grid x grid`` tiles -> ``(grid*grid*B, C, H/grid, W/grid)``.

    Tiles are ordered row-major over the grid, each tile position holding the whole
    batch: ``out[(r*grid + c)*B + b]`` is tile (r, c) of image b.
    """
    b, ch, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"size {h}x{w} does not divide into a {grid}x{grid} grid")
    th, tw = h // grid, w // grid
    t = x.reshape(b, ch, grid, th, grid, tw).permute(2, 4, 0, 1, 3, 5)
    return t.reshape(grid * grid * b, ch, th, tw)


def merge(tiles: torch.Tensor, grid: int = 2) -> torch.Tensor:
    """Inverse of :func:`tile`: ``(grid*grid*B, C, h, w)`` -> ``(B, C, grid*h, grid*w)``."""
    n, ch, th, tw = tiles.shape
    if n % (grid * grid):
        raise ValueError(f"{n} tiles is not a multiple of {grid * grid}")
    b = n // (grid * grid)
    t = tiles.reshape(grid, grid, b, ch, th, tw).permute(2, 3, 0, 4, 1, 5)
    return t.reshape(b, ch, grid * th, grid * tw)


class PuzzleSiamese(nn.Module):
    """``forward(x) -> (logits, F, F_re)`` for the ComboLoss.

    ``logits, F = model.forward_with_maps(x)`` on the full images; the tiles go through
    ``model.class_maps`` and are stitched into ``F_re``. When the stitched map's size
    differs from ``F`` (input not a multiple of ``grid`` x stride) it is resized
    bilinearly to ``F``'s size.
    """

    def __init__(self, model: nn.Module, grid: int = 2) -> None:
        super().__init__()
        self.model = model
        self.grid = grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, maps = self.model.forward_with_maps(x)
        maps_re = merge(self.model.class_maps(tile(x, self.grid)), self.grid)
        if maps_re.shape[-2:] != maps.shape[-2:]:
            maps_re = Fn.interpolate(maps_re, size=maps.shape[-2:], mode="bilinear", align_corners=False)
        return logits, maps, maps_re
