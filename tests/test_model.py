"""Puzzle-CAM model, stem widening, TTA and checkpoints (tiny backbone, no downloads)."""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from hpa_kernel.stages.model import (
    CHECKPOINT_FORMAT,
    RGBY_MEAN,
    RGBY_STD,
    CheckpointError,
    check_meta,
    PuzzleCAM,
    forward_tta,
    load_checkpoint,
    normalize,
    save_checkpoint,
    widen_model_stem,
    widen_stem,
)

BACKBONE = "resnet10t"


@pytest.fixture(scope="module")
def model() -> PuzzleCAM:
    torch.manual_seed(0)
    m = PuzzleCAM(BACKBONE, num_classes=19, in_chans=4).eval()
    with torch.no_grad():  # make some class maps negative, some positive
        m.classifier.weight.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 4, 64, 64, generator=g)


def test_widen_stem_adds_mean_filter():
    w = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
    out = widen_stem(w)
    assert out.shape == (2, 4, 3, 3)
    torch.testing.assert_close(out[:, :3], w)
    torch.testing.assert_close(out[:, 3], (w[:, 0] + w[:, 1] + w[:, 2]) / 3)
    with pytest.raises(ValueError):
        widen_stem(torch.zeros(2, 4, 3, 3))


def test_widened_model_matches_timm_4ch_layout_and_sees_yellow_as_mean():
    torch.manual_seed(0)
    m3 = timm.create_model(BACKBONE, pretrained=False, in_chans=3, num_classes=0, global_pool="").eval()
    x3 = torch.rand(1, 3, 32, 32)
    ref = m3(x3)
    widen_model_stem(m3)
    m4 = timm.create_model(BACKBONE, pretrained=False, in_chans=4, num_classes=0, global_pool="")
    shapes3 = {k: v.shape for k, v in m3.state_dict().items()}
    assert shapes3 == {k: v.shape for k, v in m4.state_dict().items()}
    # an RGB image with the yellow channel 0 gives the RGB model's output
    torch.testing.assert_close(m3(torch.cat([x3, torch.zeros(1, 1, 32, 32)], 1)), ref)
    stem = m3.get_submodule(m3.pretrained_cfg["first_conv"])
    assert stem.in_channels == 4 and stem.weight.shape[1] == 4


def test_shapes_and_forward_consistency(model, batch):
    with torch.no_grad():
        logits = model(batch)
        maps = model.class_maps(batch)
        logits2, maps2 = model.forward_with_maps(batch)
    assert logits.shape == (2, 19)
    assert maps.ndim == 4 and maps.shape[:2] == (2, 19)
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)))
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(maps2, maps)
    torch.testing.assert_close(model.class_maps(batch), maps)
    assert model.classifier.bias is None


def test_cams_in_unit_range_with_max_one_per_positive_class():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(2, 19, 5, 7, generator=g) * 3
    maps[0, 4] = -torch.rand(5, 7, generator=g)  # an all-negative class
    cams = PuzzleCAM.cams(maps)
    assert cams.shape == maps.shape
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    peak = cams.amax(dim=(2, 3))
    positive = maps.amax(dim=(2, 3)) > 0
    assert torch.allclose(peak[positive], torch.ones_like(peak[positive]), atol=1e-4)
    assert float(peak[0, 4]) == 0.0
    # the argmax of a positive class map is where the CAM is (almost) 1
    assert float(cams[1, 0].flatten()[maps[1, 0].argmax()]) == pytest.approx(1.0, abs=1e-4)


def test_minmax_cams_keep_the_ranking_of_a_map_negative_everywhere():
    """relu_max makes a map below 0 everywhere all zero; minmax keeps its order, in [0, 1]."""
    maps = torch.zeros(1, 19, 4, 4)
    maps[0, 3] = -5.0 + torch.arange(16, dtype=torch.float32).view(4, 4) / 10  # all negative
    maps[0, 5] = torch.arange(16, dtype=torch.float32).view(4, 4) - 4.0  # mixed signs
    ref, mm = PuzzleCAM.cams(maps), PuzzleCAM.cams(maps, "minmax")
    assert float(ref[0, 3].max()) == 0.0
    assert float(mm[0, 3].min()) == 0.0 and float(mm[0, 3].max()) == 1.0
    assert torch.equal(mm[0, 3].flatten().argsort(), maps[0, 3].flatten().argsort())
    torch.testing.assert_close(mm[0, 5], (maps[0, 5] + 4.0) / 15.0)
    assert torch.all(mm[0, 0] == 1.0)  # a flat map: no cell is preferred
    with pytest.raises(ValueError, match="unknown CAM normalisation"):
        PuzzleCAM.cams(maps, "softmax")


def test_normalize_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    x = rng.random((6, 5, 4), dtype=np.float32)
    n_np = normalize(x)
    expected = (x - np.array(RGBY_MEAN, np.float32)) / np.array(RGBY_STD, np.float32)
    np.testing.assert_allclose(n_np, expected, rtol=1e-6)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    n_t = normalize(t)
    np.testing.assert_allclose(n_t[0].permute(1, 2, 0).numpy(), n_np, rtol=1e-6, atol=1e-6)


class _PointwiseMaps(nn.Module):
    """Flip-equivariant stand-in: class maps from a 1x1 conv on a 2x average-pooled input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 19, 1, bias=False)

    def class_maps(self, x):
        return self.conv(torch.nn.functional.avg_pool2d(x, 2))

    def forward_with_maps(self, x):
        m = self.class_maps(x)
        return m.mean(dim=(2, 3)), m


def test_forward_tta_unflips_maps():
    x = torch.rand(2, 4, 8, 6, generator=torch.Generator().manual_seed(4))
    stub = _PointwiseMaps()
    with torch.no_grad():
        logits, maps = stub.forward_with_maps(x)
        for flips in [("none", "h", "v"), ("h",), ("v",), ("hv",)]:
            lt, mt = forward_tta(stub, x, flips=flips)
            torch.testing.assert_close(mt, maps)  # exact only if maps are flipped back
            torch.testing.assert_close(lt, logits)
        _, no_unflip = stub.forward_with_maps(x.flip(3))
        assert not torch.allclose(no_unflip, maps)


def test_forward_tta_on_puzzlecam(model, batch):
    with torch.no_grad():
        logits, maps = model.forward_with_maps(batch)
        l1, m1 = forward_tta(model, batch, flips=("none",))
        torch.testing.assert_close(l1, logits)
        torch.testing.assert_close(m1, maps)
        lb, mb = forward_tta(model, batch)
        _, mh = model.forward_with_maps(batch.flip(3))
        _, mv = model.forward_with_maps(batch.flip(2))
    torch.testing.assert_close(mb, (maps + mh.flip(3) + mv.flip(2)) / 3, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lb, mb.mean(dim=(2, 3)))
    with pytest.raises(ValueError):
        forward_tta(model, batch, flips=())


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_fp32_identical(model, batch, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.pt", image_size=64, crop_size=32, fold=2)
    loaded, meta = load_checkpoint(path)
    assert meta["format"] == CHECKPOINT_FORMAT
    assert (meta["backbone"], meta["num_classes"], meta["in_chans"]) == (BACKBONE, 19, 4)
    assert (meta["image_size"], meta["crop_size"], meta["fold"]) == (64, 32, 2)
    assert meta["mean"] == list(RGBY_MEAN) and meta["std"] == list(RGBY_STD)
    assert not loaded.training and loaded.meta == meta
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_checkpoint_half_is_smaller_and_equals_fp16_rounded_weights(model, batch, tmp_path):
    full = save_checkpoint(model, tmp_path / "f.pt")
    half = save_checkpoint(model, tmp_path / "h.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = PuzzleCAM(BACKBONE).eval()
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(loaded(batch), rounded(batch))
        torch.testing.assert_close(loaded(batch), model(batch), atol=2e-2, rtol=2e-2)


def test_save_meta_plain_values(model, tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(model, tmp_path / "x.pt", where=tmp_path)
    path = save_checkpoint(
        model, tmp_path / "y.pt", val_map=np.float32(0.5), val_loss=float("nan"), sizes=np.array([1, 2]), pair=(1, 2)
    )
    _, meta = load_checkpoint(path)
    assert meta["val_map"] == 0.5 and np.isnan(meta["val_loss"])
    assert meta["sizes"] == [1, 2] and meta["pair"] == [1, 2]


def _assert_refused(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, msg


def test_refuses_missing_file(tmp_path):
    _assert_refused(tmp_path / "nope.pt", "not found")


def test_refuses_random_bytes_and_empty_file(tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_refused(p, "not a readable torch checkpoint")
    e = tmp_path / "empty.pt"
    e.write_bytes(b"")
    _assert_refused(e)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_pickle_with_arbitrary_globals_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    p1 = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {}, "meta": _Payload(marker)}, p1)
    _assert_refused(p1, "refused")
    p2 = tmp_path / "evil_legacy.pkl"
    p2.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    _assert_refused(p2)
    assert not marker.exists()


def test_refuses_segmentation_unet_file(tmp_path, monkeypatch):
    # a whole pickled nn.Module whose class lives in pytorch_zoo.unet, like hpacellseg's files
    pkg = types.ModuleType("pytorch_zoo")
    mod = types.ModuleType("pytorch_zoo.unet")

    class DPNUnet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

    DPNUnet.__module__ = "pytorch_zoo.unet"
    DPNUnet.__qualname__ = "DPNUnet"
    mod.DPNUnet = DPNUnet
    pkg.unet = mod
    monkeypatch.setitem(sys.modules, "pytorch_zoo", pkg)
    monkeypatch.setitem(sys.modules, "pytorch_zoo.unet", mod)
    p = tmp_path / "dpn_unet_cell_3ch_v1.pth"
    torch.save(DPNUnet(), p)
    monkeypatch.delitem(sys.modules, "pytorch_zoo.unet")
    monkeypatch.delitem(sys.modules, "pytorch_zoo")
    _assert_refused(p, "segmentation")


def test_refuses_plain_state_dict_and_foreign_dicts(model, tmp_path):
    p = tmp_path / "plain.pt"
    torch.save(model.state_dict(), p)
    _assert_refused(p, "plain state dict")
    q = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], q)
    _assert_refused(q, "not a Puzzle-CAM checkpoint")
    r = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, r)
    _assert_refused(r, "not a Puzzle-CAM checkpoint")


def test_refuses_wrong_format_missing_meta_and_mismatched_weights(model, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(model, good)
    obj = torch.load(good, weights_only=True)

    bad_fmt = dict(obj, meta=dict(obj["meta"], format="something/2"))
    torch.save(bad_fmt, tmp_path / "fmt.pt")
    _assert_refused(tmp_path / "fmt.pt", "format")

    meta = dict(obj["meta"])
    del meta["backbone"]
    torch.save(dict(obj, meta=meta), tmp_path / "nometa.pt")
    _assert_refused(tmp_path / "nometa.pt", "backbone")

    torch.save(dict(obj, meta=dict(obj["meta"], backbone="resnet18")), tmp_path / "arch.pt")
    _assert_refused(tmp_path / "arch.pt", "do not fit")

    torch.save(dict(obj, meta=dict(obj["meta"], num_classes=7)), tmp_path / "ncls.pt")
    _assert_refused(tmp_path / "ncls.pt", "do not fit")

    torch.save(dict(obj, meta=dict(obj["meta"], backbone="no_such_net_xyz")), tmp_path / "name.pt")
    _assert_refused(tmp_path / "name.pt", "no_such_net_xyz")


def test_check_meta_refuses_what_the_kernel_cannot_feed_and_keeps_the_demo(model, tmp_path):
    """The one fit check (used by ``load_checkpoint``): classes, channels, sizes, mean/std."""
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "weights" / "demo" / "model.pt"
    _, meta = load_checkpoint(demo)  # a checkpoint users already have keeps loading
    check_meta(meta, demo)
    good = dict(meta)
    for change, word in [
        ({"num_classes": 10}, "num_classes"),
        ({"in_chans": 3}, "in_chans"),
        ({"image_size": 0}, "image_size"),
        ({"crop_size": -1}, "crop_size"),
        ({"crop_size": 1.5}, "crop_size"),
        ({"mean": [0.5, 0.5, 0.5]}, "mean"),
        ({"mean": [0.5, 0.5, float("nan"), 0.5]}, "mean"),
        ({"std": [0.2, 0.2, 0.0, 0.2]}, "std"),
        ({"std": "wide"}, "std"),
    ]:
        with pytest.raises(CheckpointError, match=word) as info:
            check_meta(dict(good, **change), "x.pt")
        assert str(info.value).startswith("x.pt: ") and "\n" not in str(info.value)
    check_meta(dict(good, image_size=None, crop_size=None), "x.pt")  # no size: the manifest's stands
    path = save_checkpoint(model, tmp_path / "rgb.pt", in_chans=3)
    _assert_refused(path, "in_chans")
