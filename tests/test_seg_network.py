"""Tests for hpa_kernel.stages.segmentation.network: the hpacellseg DPN-92 U-Net.

The 139 M-parameter network is built once for the module; forwards run on 64 x 64 inputs.
The reference forward below re-derives the original pytorch_zoo computation (tuple-passing
dual-path blocks, the U-Net's negative-index decoder loop) functionally from the weights,
so it checks strides, paddings, groups, BN eps and the concatenation orders independently
of the module code.
"""

from __future__ import annotations

import importlib

import hashlib
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpa_kernel.stages.segmentation import network as net_mod
from hpa_kernel.stages.segmentation.network import (
    ENCODER_WIDTHS,
    DPNUnet,
    DualPathBlock,
    build_dpn_unet,
    expected_state_dict_shapes,
)

# sha256 of the 595 lines "key<TAB>shape" of data/hpacellseg_dpnunet_state_dict.tsv (the
# public weights' state dict, in file order), joined by "\n".
TSV_SHA256 = "b2d1bc8557c5e3d11cab298d8008eeefafc4332fa7f5953d9ce96545fca4c2ee"
TSV_NAME = "hpacellseg_dpnunet_state_dict.tsv"
NUM_PARAMS = 139_108_867


def _tsv_path() -> Path | None:
    repo = Path(__file__).resolve().parent.parent
    for cand in (
        repo / "hpa_kernel" / "data" / TSV_NAME,
        repo / "data" / TSV_NAME,
        repo.parent / "shared" / "data" / TSV_NAME,
    ):
        if cand.is_file():
            return cand
    return None


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine terms, so eps and BN order matter."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def model() -> DPNUnet:
    torch.manual_seed(0)
    m = build_dpn_unet().eval()
    _randomise_bn(m, torch.Generator().manual_seed(1))
    return m


@pytest.fixture(scope="module")
def x64() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def run64(model: DPNUnet, x64: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One forward on x64 with hooks: ``out``, ``enc{i}`` (stage outputs), ``dec{i}``
    (decoder_stages outputs) and ``cat{k}`` (input of bottlenecks[k]'s conv)."""
    captured: Dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(module, inputs, output=None):
            captured[name] = (output if output is not None else inputs[0]).detach().clone()

        return hook

    for i, stage in enumerate(model.encoder_stages):
        hooks.append(stage.register_forward_hook(keep(f"enc{i}")))
    for i, dec in enumerate(model.decoder_stages):
        hooks.append(dec.register_forward_hook(keep(f"dec{i}")))
    for k, bottleneck in enumerate(model.bottlenecks):
        hooks.append(bottleneck.seq[0].register_forward_pre_hook(keep(f"cat{k}")))
    try:
        with torch.no_grad():
            captured["out"] = model(x64)
    finally:
        for h in hooks:
            h.remove()
    return captured


# --------------------------------------------------------------------------- structure
def _lines(shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    return [f"{k}\t{tuple(s)}" for k, s in shapes.items()]


def test_state_dict_matches_public_weights(model: DPNUnet) -> None:
    lines = _lines({k: tuple(v.shape) for k, v in model.state_dict().items()})
    tsv = _tsv_path()
    if tsv is not None:  # readable diff when the listing is at hand
        want = [l.rstrip("\n") for l in tsv.read_text().splitlines()]
        assert len(lines) == len(want) == 595
        for got_line, want_line in zip(lines, want):
            assert got_line == want_line
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == TSV_SHA256


def test_expected_shapes_on_meta_match_real_model(model: DPNUnet) -> None:
    assert expected_state_dict_shapes() == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_key_numbering_spot_checks(model: DPNUnet) -> None:
    sd = model.state_dict()
    assert isinstance(model.encoder_stages[1][0], nn.MaxPool2d)  # blocks of stage 1 start at 1
    assert sd["encoder_stages.1.1.c1x1_w_s1.conv.weight"].shape == (288, 64, 1, 1)
    assert sd["encoder_stages.2.0.c1x1_w_s2.conv.weight"].shape == (576, 336, 1, 1)
    assert sd["encoder_stages.4.3.bn.running_var"].shape == (2688,)
    assert sd["encoder_stages.0.0.weight"].shape == (64, 3, 7, 7)
    assert "encoder_stages.0.0.bias" not in sd
    assert sd["decoder_stages.3.layer.1.weight"].shape == (1552, 2688, 3, 3)
    assert sd["bottlenecks.0.seq.0.weight"].shape == (1552, 3104, 3, 3)
    assert sd["final.0.weight"].shape == (3, 64, 3, 3)


def test_batch_norm_eps_and_param_count(model: DPNUnet) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 3 * 30 + 4 + 1  # stem, 3 per block, 4 projections, CatBnAct
    assert all(bn.eps == pytest.approx(1e-3) for bn in bns)
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS  # buffers excluded


def test_dual_path_block_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="block_type"):
        DualPathBlock(8, 4, 4, 8, 2, 2, block_type="up")


# --------------------------------------------------------------------------- forward
def test_forward_shape_and_finite(run64: Dict[str, torch.Tensor]) -> None:
    out64 = run64["out"]
    assert out64.shape == (1, 3, 64, 64)
    assert out64.dtype == torch.float32
    assert torch.isfinite(out64).all()
    assert out64.std() > 0  # not a constant map


def test_forward_rejects_sides_not_multiple_of_32(model: DPNUnet) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 64))


def test_encoder_widths_and_strides(run64: Dict[str, torch.Tensor]) -> None:
    feats = [run64[f"enc{i}"] for i in range(5)]
    assert [f.shape[1] for f in feats] == list(ENCODER_WIDTHS)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert feats[-1].min() >= 0  # stage 4 ends in BN + ReLU


def test_bottleneck_input_is_decoder_then_encoder(run64: Dict[str, torch.Tensor]) -> None:
    captured = run64
    for k in range(4):
        level = 4 - k  # bottlenecks[k] joins decoder_stages[level-1] with encoder stage level-1
        dec, enc, cat = captured[f"dec{level - 1}"], captured[f"enc{level - 1}"], captured[f"cat{k}"]
        assert dec.shape[1] == enc.shape[1] == ENCODER_WIDTHS[level - 1]
        assert cat.shape[1] == 2 * ENCODER_WIDTHS[level - 1]
        assert torch.equal(cat[:, : dec.shape[1]], dec)
        assert torch.equal(cat[:, dec.shape[1] :], enc)


# --------------------------------------------------------------------------- reference
def _bn(bn: nn.BatchNorm2d, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, eps)


def _bn_act_conv(m: nn.Module, x: torch.Tensor, stride: int, eps: float) -> torch.Tensor:
    w = m.conv.weight
    groups = x.shape[1] // w.shape[1]
    return F.conv2d(F.relu(_bn(m.bn, x, eps)), w, stride=stride, padding=w.shape[-1] // 2, groups=groups)


def _ref_block(blk: nn.Module, x, eps: float):
    """pytorch_zoo.dpn.DualPathBlock.forward: tuple in, (resid, dense) out."""
    x_in = torch.cat(x, dim=1) if isinstance(x, tuple) else x
    proj = blk._modules.get("c1x1_w_s2") or blk._modules.get("c1x1_w_s1")
    stride = 2 if "c1x1_w_s2" in blk._modules else 1
    c_plus_inc = blk.c1x1_c.conv.weight.shape[0]
    if proj is not None:
        inc = proj.conv.weight.shape[0] - c_plus_inc
        c = c_plus_inc - inc
        x_s = _bn_act_conv(proj, x_in, stride, eps)
        x_s1, x_s2 = x_s[:, :c], x_s[:, c:]
    else:
        x_s1, x_s2 = x
        c = x_s1.shape[1]
    y = _bn_act_conv(blk.c1x1_a, x_in, 1, eps)
    y = _bn_act_conv(blk.c3x3_b, y, stride, eps)
    y = _bn_act_conv(blk.c1x1_c, y, 1, eps)
    return x_s1 + y[:, :c], torch.cat([x_s2, y[:, c:]], dim=1)


def _ref_conv_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))


def _reference_forward(
    model: DPNUnet, x: torch.Tensor, eps: float = 1e-3, stages: int = 5
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """pytorch_zoo.abstract_model.DPEncoderDecoder.forward, written out from the weights:
    (logits, encoder results); with ``stages < 5`` only that many encoder stages."""
    enc_stages = model.encoder_stages
    enc_results = []
    # stage 0: conv 7x7/2 pad 3 -> BN -> ReLU
    x = F.relu(_bn(enc_stages[0][1], F.conv2d(x, enc_stages[0][0].weight, stride=2, padding=3), eps))
    enc_results.append(x.clone())
    for s in range(1, stages):
        for layer in enc_stages[s]:
            if isinstance(layer, nn.MaxPool2d):
                x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
            elif isinstance(layer, net_mod.CatBnAct):
                x = F.relu(_bn(layer.bn, torch.cat(x, dim=1) if isinstance(x, tuple) else x, eps))
            else:
                x = _ref_block(layer, x, eps)
        enc_results.append(torch.cat(x, dim=1) if isinstance(x, tuple) else x.clone())
    if stages < 5:
        return torch.empty(0), enc_results
    for idx, bottleneck in enumerate(model.bottlenecks):
        rev_idx = -(idx + 1)
        dec = model.decoder_stages[rev_idx].layer[1]
        x = _ref_conv_relu(dec, F.interpolate(x, scale_factor=2, mode="nearest"))
        x = _ref_conv_relu(bottleneck.seq[0], torch.cat([x, enc_results[rev_idx - 1]], dim=1))
    x = _ref_conv_relu(model.last_upsample.layer[1], F.interpolate(x, scale_factor=2, mode="nearest"))
    return F.conv2d(x, model.final[0].weight, model.final[0].bias, padding=1), enc_results


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())))


def test_forward_matches_reference_computation(model: DPNUnet, x64: torch.Tensor, run64) -> None:
    with torch.no_grad():
        ref, ref_enc = _reference_forward(model, x64)
        assert _close(run64["out"], ref)
        for i, feat in enumerate(ref_enc):
            assert _close(run64[f"enc{i}"], feat), f"encoder stage {i}"
        # the comparison is sharp enough to see a wrong batch-norm epsilon (stages 0-1 suffice)
        _, ref_enc_eps = _reference_forward(model, x64, eps=1e-5, stages=2)
        assert not _close(run64["enc1"], ref_enc_eps[1])


def test_forward_encoder_smallest_input(model: DPNUnet, x64: torch.Tensor) -> None:
    with torch.no_grad():
        feats = model.forward_encoder(x64[..., :32, :32])
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]


def test_block_matches_timm_dual_path_block() -> None:
    """Same maths as timm's DPN block, for the three block types."""
    timm_dpn = importlib.import_module("timm.models.dpn")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 8, 8, generator=gen)
    for block_type, in_chs in (("proj", 24), ("down", 24), ("normal", 40)):
        args = (in_chs, 16, 16, 32, 4, 4, block_type)
        ours = DualPathBlock(*args).eval()
        _randomise_bn(ours, gen)
        theirs = timm_dpn.DualPathBlock(*args).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        xin = x if in_chs == 24 else torch.randn(2, in_chs, 8, 8, generator=gen)
        with torch.no_grad():
            got = ours(xin)
            want = theirs(xin)
        if isinstance(want, tuple):  # timm < 1.0 passes (residual, dense)
            want = torch.cat(want, dim=1)
        assert torch.allclose(got, want, atol=1e-5), block_type
        ours_tuple = ours((xin[:, :32], xin[:, 32:])) if block_type == "normal" else None
        if ours_tuple is not None:
            assert torch.equal(ours_tuple, got)
