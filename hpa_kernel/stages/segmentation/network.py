"""The hpacellseg DPN-92 U-Net (``docs/METHOD.md``, "Segmentation"), written to match the public weights.

hpacellseg's nuclei and cell networks are ``pytorch_zoo.unet.DPNUnet`` instances: a
DPN-92 encoder cut into five stages and a light U-Net decoder. This module rebuilds that
network with the same module tree, so that :meth:`DPNUnet.state_dict` has exactly the
595 keys, shapes and order of the public files, and computes the same function.

Encoder (DPN-92: ``k_r=96, groups=32, k_sec=(3, 4, 20, 3), inc_sec=(16, 32, 24, 128)``,
batch-norm eps 0.001)::

    encoder_stages.0   conv 7x7/2 (no bias) -> BN -> ReLU                          64 ch, 1/2
    encoder_stages.1   max-pool 3x3/2 (index 0), conv2_1..3 (indices 1..3)       336 ch, 1/4
    encoder_stages.2   conv3_1..4                                                 704 ch, 1/8
    encoder_stages.3   conv4_1..20                                               1552 ch, 1/16
    encoder_stages.4   conv5_1..3, then CatBnAct (BN + ReLU)                     2688 ch, 1/32

The original dual-path blocks pass a ``(residual, dense)`` tuple between them and the
U-Net stores a stage that ends in such a pair as ``torch.cat(pair, 1)``. Here, as in
timm >= 1.0, the pair always travels as that concatenation (residual channels first),
which is the same arithmetic with one tensor type.

Decoder, deepest first, ``for i in 4, 3, 2, 1``::

    x = decoder_stages[i - 1](x)                      # nearest 2x -> conv 3x3 -> ReLU
    x = bottlenecks[4 - i](cat([x, enc[i - 1]], 1))   # conv 3x3 -> ReLU, [decoder, skip]

then ``last_upsample`` (nearest 2x -> conv 3x3 64->64 -> ReLU) and ``final`` (conv 3x3
64->3). :meth:`DPNUnet.forward` returns the raw logits; hpacellseg applies the softmax
over the three channels (background, border, interior) itself.

The blocks are our own (same maths and parameter names as ``pytorch_zoo.dpn`` and
``timm.models.dpn``) rather than timm's, whose block interface and final activation (ELU
in ``conv5_bn_ac``) differ from the network the weights were trained in.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "BN_EPS",
    "ENCODER_WIDTHS",
    "BnActConv2d",
    "CatBnAct",
    "DualPathBlock",
    "UnetDecoderBlock",
    "ConvBottleneck",
    "DPNUnet",
    "build_dpn_unet",
    "expected_state_dict_shapes",
]

BN_EPS = 1e-3
"""Batch-norm epsilon of every DPN batch norm (the MXNet original's value)."""

ENCODER_WIDTHS: Tuple[int, ...] = (64, 336, 704, 1552, 2688)
"""Channels of encoder stages 0..4 (stages 1..3 as residual + dense concatenation)."""

# DPN-92 hyper-parameters (Chen et al., 2017; pytorch_zoo.dpn.dpn92 / timm dpn92).
_NUM_INIT_FEATURES = 64
_K_R = 96
_GROUPS = 32
_K_SEC = (3, 4, 20, 3)
_INC_SEC = (16, 32, 24, 128)
_BW_FACTOR = 4

TensorOrPair = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _as_tensor(x: TensorOrPair) -> torch.Tensor:
    """A ``(residual, dense)`` pair as one tensor (channels concatenated); tensors pass."""
    return torch.cat(x, dim=1) if isinstance(x, (tuple, list)) else x


class BnActConv2d(nn.Module):
    """Pre-activation conv: BN -> ReLU -> conv (no bias), padding ``kernel_size // 2``.

    Parameter names ``bn.*`` and ``conv.weight`` as in ``pytorch_zoo.dpn.BnActConv2d``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.bn(x)))


class CatBnAct(nn.Module):
    """BN -> ReLU over the concatenated ``(residual, dense)`` pair (DPN's ``conv5_bn_ac``)."""

    def __init__(self, in_chs: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: TensorOrPair) -> torch.Tensor:
        return self.act(self.bn(_as_tensor(x)))


class DualPathBlock(nn.Module):
    """One DPN block on the concatenated ``(residual, dense)`` tensor.

    ``block_type`` is ``"proj"`` (first block of the first stage: 1x1 projection of the
    input, stride 1, parameters ``c1x1_w_s1``), ``"down"`` (first block of the other
    stages: projection with stride 2, ``c1x1_w_s2``) or ``"normal"`` (no projection: the
    input already is ``[residual (num_1x1_c ch), dense]``).

    With ``y = c1x1_c(c3x3_b(c1x1_a(x)))`` and ``s = proj(x)`` (or ``x``), the output is
    ``cat([s[:, :c] + y[:, :c], s[:, c:], y[:, c:]])`` with ``c = num_1x1_c``: the new
    residual path followed by the dense path grown by ``inc`` channels.
    """

    def __init__(
        self,
        in_chs: int,
        num_1x1_a: int,
        num_3x3_b: int,
        num_1x1_c: int,
        inc: int,
        groups: int,
        block_type: str = "normal",
    ) -> None:
        super().__init__()
        if block_type not in ("proj", "down", "normal"):
            raise ValueError(f"block_type must be 'proj', 'down' or 'normal', not {block_type!r}")
        self.num_1x1_c = num_1x1_c
        self.inc = inc
        self.key_stride = 2 if block_type == "down" else 1
        # Registered before c1x1_a so that the state-dict order matches the original.
        self.proj_name: Optional[str] = None
        if block_type != "normal":
            self.proj_name = "c1x1_w_s2" if self.key_stride == 2 else "c1x1_w_s1"
            self.add_module(
                self.proj_name,
                BnActConv2d(in_chs, num_1x1_c + 2 * inc, kernel_size=1, stride=self.key_stride),
            )
        self.c1x1_a = BnActConv2d(in_chs, num_1x1_a, kernel_size=1)
        self.c3x3_b = BnActConv2d(num_1x1_a, num_3x3_b, kernel_size=3, stride=self.key_stride, groups=groups)
        self.c1x1_c = BnActConv2d(num_3x3_b, num_1x1_c + inc, kernel_size=1)

    def forward(self, x: TensorOrPair) -> torch.Tensor:
        x = _as_tensor(x)
        shortcut = getattr(self, self.proj_name)(x) if self.proj_name is not None else x
        c = self.num_1x1_c
        y = self.c1x1_c(self.c3x3_b(self.c1x1_a(x)))
        return torch.cat([shortcut[:, :c] + y[:, :c], shortcut[:, c:], y[:, c:]], dim=1)


class UnetDecoderBlock(nn.Module):
    """Nearest 2x upsample -> conv 3x3 (padding 1, bias) -> ReLU; keys ``layer.1.*``."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_chs, out_chs, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class ConvBottleneck(nn.Module):
    """conv 3x3 (padding 1, bias) -> ReLU on ``cat([dec, enc], 1)``; keys ``seq.0.*``."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        return self.seq(torch.cat([dec, enc], dim=1))


def _dpn92_stages(in_chans: int = 3) -> List[nn.Sequential]:
    """The five DPN-92 encoder stages, laid out as hpacellseg's ``DPNUnet.get_encoder``."""
    stem = nn.Sequential(
        nn.Conv2d(in_chans, _NUM_INIT_FEATURES, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(_NUM_INIT_FEATURES, eps=BN_EPS),
        nn.ReLU(inplace=True),
    )
    stages = [stem]
    in_chs = _NUM_INIT_FEATURES
    for i, (depth, inc) in enumerate(zip(_K_SEC, _INC_SEC)):
        bw = 64 * 2**i * _BW_FACTOR
        r = _K_R * bw // (64 * _BW_FACTOR)
        blocks: List[nn.Module] = []
        if i == 0:
            blocks.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        blocks.append(DualPathBlock(in_chs, r, r, bw, inc, _GROUPS, "proj" if i == 0 else "down"))
        in_chs = bw + 3 * inc
        for _ in range(2, depth + 1):
            blocks.append(DualPathBlock(in_chs, r, r, bw, inc, _GROUPS, "normal"))
            in_chs += inc
        if i == len(_K_SEC) - 1:
            blocks.append(CatBnAct(in_chs))
        if in_chs != ENCODER_WIDTHS[i + 1]:  # pragma: no cover - guards the constants above
            raise AssertionError(f"stage {i + 1} has {in_chs} channels, expected {ENCODER_WIDTHS[i + 1]}")
        stages.append(nn.Sequential(*blocks))
    return stages


class DPNUnet(nn.Module):
    """hpacellseg's DPN-92 U-Net (``pytorch_zoo.unet.DPNUnet(3, 3)``).

    Args:
        num_classes: output channels (hpacellseg: 3 = background, border, interior).
        in_chans: input channels (hpacellseg: 3; normalisation in :mod:`.inference`).

    ``forward(x)`` takes ``(B, in_chans, H, W)`` with H and W multiples of 32 and returns
    raw logits ``(B, num_classes, H, W)``. Submodules are registered in the original order
    (bottlenecks, decoder_stages, last_upsample, final, encoder_stages), so the state-dict
    keys come out in the order of the public weight files.
    """

    def __init__(self, num_classes: int = 3, in_chans: int = 3) -> None:
        super().__init__()
        widths = ENCODER_WIDTHS
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.bottlenecks = nn.ModuleList([ConvBottleneck(2 * w, w) for w in reversed(widths[:-1])])
        self.decoder_stages = nn.ModuleList(
            [UnetDecoderBlock(widths[i], widths[i - 1]) for i in range(1, len(widths))]
        )
        self.last_upsample = UnetDecoderBlock(widths[0], widths[0])
        self.final = nn.Sequential(nn.Conv2d(widths[0], num_classes, 3, padding=1))
        self.encoder_stages = nn.ModuleList(_dpn92_stages(in_chans))

    def forward_encoder(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Outputs of encoder stages 0..4 (widths :data:`ENCODER_WIDTHS`)."""
        features = []
        for stage in self.encoder_stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if size[0] % 32 or size[1] % 32:
            raise ValueError(f"DPNUnet input sides must be multiples of 32, got {tuple(size)}")
        enc = self.forward_encoder(x)
        x = enc[-1]
        n = len(self.bottlenecks)
        for k, bottleneck in enumerate(self.bottlenecks):
            i = n - k  # 4, 3, 2, 1: up from level i, joined with encoder level i - 1
            x = self.decoder_stages[i - 1](x)
            x = bottleneck(x, enc[i - 1])
        x = self.last_upsample(x)
        return self.final(x)


def build_dpn_unet(num_classes: int = 3, in_chans: int = 3) -> DPNUnet:
    """A randomly initialised :class:`DPNUnet` (load weights with ``weights.load_hpa_unet``).

    Call it under ``with torch.device("meta"):`` for a parameter-free skeleton.
    """
    return DPNUnet(num_classes=num_classes, in_chans=in_chans)


def expected_state_dict_shapes(model: Optional[nn.Module] = None) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a :class:`DPNUnet` state dict, in order, built on the meta device."""
    if model is None:
        with torch.device("meta"):
            model = build_dpn_unet()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
