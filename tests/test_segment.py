"""predict_hpa (with tiny stand-in networks) and the Segmenter front end."""

from __future__ import annotations

import importlib

import logging

import numpy as np
import pytest
import torch
from torch import nn

from hpa_kernel.config import SegmentationConfig
from hpa_kernel.stages.segmentation import SegResult, create_segmenter, segmenter_names
from hpa_kernel.stages.segmentation.inference import predict_hpa
from hpa_kernel.stages.segmentation.inference import MEAN, STD, pad_to_multiple
from oracles import best_match_iou


class Conv1x1(nn.Module):
    """A per-pixel stand-in for a U-Net that refuses sides not a multiple of 32."""

    def __init__(self, weight: np.ndarray | None = None, bias: np.ndarray | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.5)  # would make outputs random in train mode
        with torch.no_grad():
            self.conv.weight.copy_(torch.as_tensor(np.eye(3) if weight is None else weight).view(3, 3, 1, 1))
            self.conv.bias.copy_(torch.as_tensor(np.zeros(3) if bias is None else bias))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise RuntimeError(f"side not a multiple of 32: {tuple(x.shape)}")
        return self.drop(self.conv(x))


def expected_softmax_u8(net_input: np.ndarray) -> np.ndarray:
    """(…, 3) raw [0,1] input of an identity 1x1 net -> the uint8 softmax predict_hpa must give."""
    z = (net_input - np.array(MEAN)) / np.array(STD)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.rint(255 * e / e.sum(axis=-1, keepdims=True)).astype(np.uint8)


@pytest.mark.parametrize("side", [432, 500, 64, 20])
def test_predict_hpa_any_side_channels_and_normalisation(side: int) -> None:
    rng = np.random.default_rng(side)
    images = rng.random((2, side, side, 4), dtype=np.float32)
    nuc_net, cell_net = Conv1x1(), Conv1x1()
    nuc, cell = predict_hpa(nuc_net, cell_net, images)
    assert nuc.shape == cell.shape == (2, side, side, 3)
    assert nuc.dtype == cell.dtype == np.uint8
    assert all(s[-1] % 32 == 0 and s[-1] >= side for s in nuc_net.seen + cell_net.seen)
    # a per-pixel net makes any crop misalignment visible
    b = images[..., 2]
    exp_nuc = expected_softmax_u8(np.stack([b, b, b], axis=-1))
    exp_cell = expected_softmax_u8(images[..., [0, 3, 2]])  # red, yellow, blue
    assert np.abs(nuc.astype(int) - exp_nuc).max() <= 1
    assert np.abs(cell.astype(int) - exp_cell).max() <= 1
    assert not nuc_net.training and not cell_net.training


def test_predict_hpa_batching_single_image_and_fp16_on_cpu() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((3, 96, 96, 4), dtype=np.float32)
    w = rng.normal(size=(3, 3))
    nets = Conv1x1(w), Conv1x1(w.T)
    full = predict_hpa(*nets, images)
    one_by_one = predict_hpa(*nets, images, batch_size=1)
    fp16 = predict_hpa(*nets, images, fp16=True)  # autocast is CUDA-only: same result on CPU
    for a, b, c in zip(full, one_by_one, fp16):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    nuc1, cell1 = predict_hpa(*nets, images[1])
    assert nuc1.shape == (96, 96, 3) and np.array_equal(nuc1, full[0][1])
    with pytest.raises(ValueError):
        predict_hpa(*nets, images[..., :3])


def test_pad_to_multiple_reflects_and_splits() -> None:
    x = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    y, (top, bottom, left, right) = pad_to_multiple(x)
    assert y.shape[-2:] == (32, 32) and (top, bottom, left, right) == (11, 11, 11, 11)
    assert torch.equal(y[..., top : top + 10, left : left + 10], x)
    assert pad_to_multiple(torch.zeros(1, 3, 64, 96))[1] == (0, 0, 0, 0)


# ---------------------------------------------------------------- Segmenter


def blob_image(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Six round cells, two pairs touching, nucleus in blue, cytoplasm in red + yellow."""
    centres = [(60, 60), (60, 118), (180, 70), (180, 190), (70, 200), (128, 128)]
    yy, xx = np.mgrid[:size, :size]
    d2 = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres])
    dmin = d2.min(axis=0)
    cells = np.where(dmin <= 30**2, np.argmin(d2, axis=0) + 1, 0).astype(np.int32)
    image = np.zeros((size, size, 4), np.float32)
    image[..., 0] = 0.5 * (cells > 0) * (1 - 0.5 * np.sqrt(dmin) / 30)
    image[..., 3] = 0.4 * (cells > 0)
    image[..., 2] = 0.8 * (dmin <= 11**2)
    return image, cells


def oracle_nets() -> tuple[nn.Module, nn.Module]:
    """1x1 'networks' whose softmax marks bright blue (nuclei) / red+yellow (cells) as interior."""
    a = 4.0
    # nuclei input: (B, B, B) normalised; interior rises with blue
    nuc = Conv1x1(np.array([[0, 0, -a], [0, 0, 0], [0, 0, a]]), np.array([0.0, -10.0, 0.0]))
    # cell input: (R, Y, B) normalised; interior rises with red + yellow
    cell = Conv1x1(np.array([[-1, -1, 0], [0, 0, 0], [1, 1, 0]]), np.array([-2.5, -10.0, 2.5]))
    return nuc, cell


def hpa_config(scale: str) -> SegmentationConfig:
    return SegmentationConfig(method="hpa", nuclei=None, cell=None, scale=scale, batch_size=2)


@pytest.mark.parametrize("scale", ["512", "full"])
def test_segmenter_hpa_scales(scale: str) -> None:
    image, truth = blob_image()
    seg = create_segmenter(hpa_config(scale), models=oracle_nets())
    out = seg.segment(np.stack([image, image, np.zeros_like(image)]), [(1024, 1024)] * 3)
    assert len(out) == 3 and all(isinstance(r, SegResult) for r in out)
    for r in out:
        assert r.cells.shape == (256, 256) and r.cells.dtype == np.int32
    assert out[0].n_cells == 6 and np.array_equal(out[0].cells, out[1].cells)
    assert np.array_equal(np.unique(out[0].cells), np.arange(7))
    assert best_match_iou(truth, out[0].cells).min() > 0.8
    assert out[2].n_cells == 0  # all-black image


def test_segmenter_fast_and_full_agree_on_432() -> None:
    """1728 px originals give S = 432 (not a multiple of 32)."""
    image, truth = blob_image(432)
    sizes = [(1728, 1728)]
    fast = create_segmenter(hpa_config("512"), models=oracle_nets()).segment(image[None], sizes)[0]
    full = create_segmenter(hpa_config("full"), models=oracle_nets()).segment(image[None], sizes)[0]
    assert fast.cells.shape == full.cells.shape == (432, 432)
    assert fast.n_cells == full.n_cells == 6
    assert best_match_iou(full.cells, fast.cells).mean() > 0.9


def test_segmenter_classic_logs_and_segments(caplog: pytest.LogCaptureFixture) -> None:
    image, truth = blob_image()
    with caplog.at_level(logging.INFO, logger="hpa_kernel.stages.segmentation"):
        seg = create_segmenter(SegmentationConfig(method="classic"))
    assert "weight-free" in caplog.text and "no segmentation weights" in caplog.text
    [res] = seg.segment(image, [(256, 256)])
    assert res.cells.dtype == np.int32 and res.n_cells == 6
    assert best_match_iou(truth, res.cells).min() > 0.8
    [res2] = create_segmenter().segment(image[None], [(256, 256)])  # default config = classic
    assert np.array_equal(res.cells, res2.cells)


def test_segmenter_refuses_bad_arguments() -> None:
    image, _ = blob_image(64)
    seg = create_segmenter()
    with pytest.raises(ValueError):
        seg.segment(np.stack([image, image]), [(64, 64)])  # one size for two images
    with pytest.raises(ValueError):
        seg.segment(image[..., :3], [(64, 64)])
    with pytest.raises(ValueError):
        create_segmenter(SegmentationConfig(method="hpa"))  # no weight paths
    with pytest.raises(ValueError):
        create_segmenter(SegmentationConfig(method="cellpose"))


def test_missing_or_wrong_weight_files_raise_the_loaders_error(tmp_path) -> None:
    weights = importlib.import_module("hpa_kernel.stages.segmentation.weights")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    for nuclei, cell in [(tmp_path / "missing.pth", tmp_path / "missing2.pth"), (junk, junk)]:
        cfg = SegmentationConfig(method="hpa", nuclei=nuclei, cell=cell)
        with pytest.raises(weights.WeightFileError):
            create_segmenter(cfg)


def test_full_scale_relabel_keeps_more_than_255_cells() -> None:
    from hpa_kernel.stages.labels import relabel

    cells = np.repeat(np.repeat(np.arange(1, 301, dtype=np.int32).reshape(15, 20), 4, 0), 4, 1)
    cells[cells == 7] = 0  # a vanished cell leaves a gap
    res = SegResult(relabel(cells))
    assert res.cells.dtype == np.int32 and res.cells.max() == 299
    assert np.array_equal(np.unique(res.cells), np.arange(300))


def test_predict_hpa_with_the_real_network_shape() -> None:
    """The DPN U-Net (random weights) through predict_hpa on a small odd-sized image."""
    network = importlib.import_module("hpa_kernel.stages.segmentation.network")
    torch.manual_seed(0)
    net = network.build_dpn_unet()
    images = np.random.default_rng(0).random((1, 24, 24, 4), dtype=np.float32)  # padded to 32
    nuc, cell = predict_hpa(net, net, images)
    assert nuc.shape == cell.shape == (1, 24, 24, 3) and nuc.dtype == np.uint8
    # softmax x 255: the three channels sum to 255 up to rounding
    assert np.abs(nuc.astype(int).sum(-1) - 255).max() <= 2


def test_every_manifest_method_is_a_registered_segmenter() -> None:
    from hpa_kernel.config import SEGMENTATION_METHODS

    assert segmenter_names() == sorted(SEGMENTATION_METHODS)
    assert type(create_segmenter()).name == "classic"
