"""The Puzzle-CAM ComboLoss.

``ComboLoss = BCEWithLogits(logits, y) + BCEWithLogits(GAP(F_re), y) + gamma * L1(F, F_re)``
with ``gamma`` 0.5 by default (the value the reference actually trained with; the
write-up mentions 0.25-0.5). Computed in float32 even under fp16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

__all__ = ["ComboLoss"]


class ComboLoss(nn.Module):
    """``forward(logits, F, F_re, target) -> dict`` with ``loss`` (the sum to backprop)
    and its parts ``bce``, ``bce_re``, ``l1`` (detached)."""

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__()
        self.gamma = float(gamma)

    def forward(
        self, logits: torch.Tensor, maps: torch.Tensor, maps_re: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        target = target.float()
        bce = Fn.binary_cross_entropy_with_logits(logits.float(), target)
        logits_re = maps_re.float().mean(dim=(2, 3))
        bce_re = Fn.binary_cross_entropy_with_logits(logits_re, target)
        l1 = (maps.float() - maps_re.float()).abs().mean()
        loss = bce + bce_re + self.gamma * l1
        return {"loss": loss, "bce": bce.detach(), "bce_re": bce_re.detach(), "l1": l1.detach()}
