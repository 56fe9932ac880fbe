import pytest
import torch
from torch import nn

from hpa_kernel.train.losses import ComboLoss
from hpa_kernel.train.puzzle import PuzzleSiamese, merge, tile


def test_tile_merge_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, 12, generator=g)
    t = tile(x, 2)
    assert t.shape == (12, 5, 4, 6)
    assert torch.equal(merge(t, 2), x)
    # tile (r, c) of image b sits at index (r*grid + c)*B + b
    assert torch.equal(t[(1 * 2 + 0) * 3 + 2], x[2, :, 4:8, 0:6])
    assert torch.equal(t[(0 * 2 + 1) * 3 + 1], x[1, :, 0:4, 6:12])
    x3 = torch.randn(2, 1, 9, 9, generator=g)
    assert torch.equal(merge(tile(x3, 3), 3), x3)


def test_tile_refuses_uneven_sizes():
    with pytest.raises(ValueError):
        tile(torch.zeros(1, 1, 7, 8), 2)
    with pytest.raises(ValueError):
        merge(torch.zeros(3, 1, 2, 2), 2)


class _PointwiseNet(nn.Module):
    """A per-pixel (1x1 conv, stride 4 pooling) net: tiles see exactly what the full image sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 19, 1, bias=False)

    def class_maps(self, x):
        return self.conv(nn.functional.avg_pool2d(x, 4))

    def forward_with_maps(self, x):
        f = self.class_maps(x)
        return f.mean((2, 3)), f


def test_siamese_stitched_maps_equal_full_maps_for_a_local_net():
    net = PuzzleSiamese(_PointwiseNet(), grid=2)
    x = torch.randn(2, 4, 32, 32)
    logits, f, f_re = net(x)
    assert logits.shape == (2, 19) and f.shape == f_re.shape == (2, 19, 8, 8)
    assert torch.allclose(f, f_re, atol=1e-6)


def test_combo_loss_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 19)
    f = torch.randn(2, 19, 4, 4)
    f_re = f + 0.5
    y = (torch.rand(2, 19) > 0.5).float()
    out = ComboLoss(gamma=0.25)(logits, f, f_re, y)  # an explicit gamma is honoured
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y)
    bce_re = nn.functional.binary_cross_entropy_with_logits(f_re.mean((2, 3)), y)
    assert out["bce"] == pytest.approx(float(bce), rel=1e-6)
    assert out["bce_re"] == pytest.approx(float(bce_re), rel=1e-6)
    assert out["l1"] == pytest.approx(0.5, rel=1e-6)
    assert out["loss"] == pytest.approx(float(bce + bce_re + 0.125), rel=1e-6)
    assert ComboLoss(0.0)(logits, f, f_re, y)["loss"] == pytest.approx(float(bce + bce_re), rel=1e-6)


def test_combo_loss_backpropagates_through_both_branches():
    net = PuzzleSiamese(_PointwiseNet(), grid=2)
    x = torch.randn(2, 4, 16, 16)
    y = torch.zeros(2, 19)
    y[:, 3] = 1
    loss = ComboLoss()(*net(x), y)["loss"]
    loss.backward()
    assert net.model.conv.weight.grad is not None and net.model.conv.weight.grad.abs().sum() > 0
