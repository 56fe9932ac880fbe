"""Offline ImageNet start: a tiny timm model's weights from a local file, stem widened to RGBY."""

import pytest
import timm
import torch

from hpa_kernel.stages.model import PuzzleCAM, save_checkpoint
from hpa_kernel.train.pretrained import PretrainedError, build_model, load_stage_weights


@pytest.fixture(scope="module")
def rgb_file(tmp_path_factory):
    """A 3-channel ImageNet-shaped test_resnet (1000 classes), saved as a plain state dict."""
    torch.manual_seed(3)
    rgb = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path_factory.mktemp("pre") / "test_resnet.pth"
    torch.save(rgb.state_dict(), path)
    return path, rgb.state_dict()


def test_weights_come_from_the_local_file_and_the_stem_is_widened(rgb_file):
    path, sd = rgb_file
    model, source = build_model("test_resnet", 19, path)
    enc = model.encoder.state_dict()
    stem = enc["conv1.0.weight"]
    assert stem.shape[1] == 4 and sd["conv1.0.weight"].shape[1] == 3
    assert torch.equal(stem[:, :3], sd["conv1.0.weight"])
    assert torch.allclose(stem[:, 3], sd["conv1.0.weight"].mean(dim=1))
    same = [k for k in enc if k != "conv1.0.weight" and k in sd]
    assert len(same) > 10 and all(torch.equal(enc[k], sd[k]) for k in same)  # every other layer from the file
    assert "fc.weight" not in enc  # the ImageNet head is dropped
    assert str(path) in source and "stem widened" in source
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 64, 64)).shape == (1, 19)


def test_classifier_is_bias_free_kaiming_normal():
    torch.manual_seed(0)
    model, source = build_model("test_resnet", 19, None)
    w = model.classifier.weight.detach()
    assert model.classifier.bias is None and "pretrained false" in source
    fan_in = w.shape[1]
    # Kaiming normal: std sqrt(2 / fan_in); torch's default conv init would give 1 / sqrt(3 fan_in)
    assert float(w.std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)
    assert abs(float(w.mean())) < 0.2 * (2 / fan_in) ** 0.5


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(PretrainedError) as e:
        build_model("seresnext50_32x4d", 19, tmp_path / "seresnext50_32x4d.pth")
    msg = str(e.value)
    assert "\n" not in msg and "seresnext50_32x4d.pth not found" in msg
    assert "timm.create_model('seresnext50_32x4d', pretrained=True)" in msg
    assert "timm/seresnext50_32x4d.racm_in1k" in msg


def test_wrong_file_is_one_clear_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(PretrainedError, match=r"other.pth does not load into timm test_resnet"):
        build_model("test_resnet", 19, path)


def test_init_from_an_earlier_stage(tmp_path):
    torch.manual_seed(1)
    earlier = PuzzleCAM("test_resnet")
    ckpt = save_checkpoint(earlier, tmp_path / "best.pt", half=True, epoch=7)
    model, _ = build_model("test_resnet", 19, None)
    desc = load_stage_weights(model, ckpt)
    assert "epoch 7" in desc
    for k, v in earlier.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(model.state_dict()[k], v.half().float()), k
    with pytest.raises(PretrainedError, match="resnet10t"):
        load_stage_weights(PuzzleCAM("resnet10t"), ckpt)
    with pytest.raises(PretrainedError, match="not found"):
        load_stage_weights(model, tmp_path / "none.pt")
