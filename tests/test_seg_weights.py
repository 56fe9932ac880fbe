"""Tests for hpa_kernel.stages.segmentation.weights: the restricted loader of hpacellseg weights.

The test files are written here in the public format: module classes named like
pytorch_zoo's (``pytorch_zoo.unet.DPNUnet``, ``pytorch_zoo.dpn.DualPathBlock``, ...) are
registered in ``sys.modules`` only while ``torch.save`` runs, so the pickles name those
globals and loading has to work without them (pytorch_zoo is not installed).

Format plumbing and refusals run on a small module tree; the end-to-end checks of
``load_hpa_unet`` use one full 139 M-parameter network built for the module (each of
those writes and reads a ~560 MB file).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from hpa_kernel.stages.segmentation import network as net
from hpa_kernel.stages.segmentation import weights as weights_mod
from hpa_kernel.stages.segmentation.network import expected_state_dict_shapes
from hpa_kernel.stages.segmentation.weights import (
    StandIn,
    WeightFileError,
    load_hpa_unet,
    read_weight_file,
    restricted_load,
)


# --------------------------------------------------------------------------- public format
class _Public(nn.Module):
    """Base of the pytorch_zoo look-alikes: children given as keyword arguments."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


# Named as the originals so that legacy saves can store their source (inspect finds them).
class DPNUnet(_Public):
    pass


class DualPathBlock(_Public):
    pass


class BnActConv2d(_Public):
    pass


class CatBnAct(_Public):
    pass


class ConvBottleneck(_Public):
    pass


class UnetDecoderBlock(_Public):
    pass


_ORIGIN_MODULE = {
    DPNUnet: "pytorch_zoo.unet",
    DualPathBlock: "pytorch_zoo.dpn",
    BnActConv2d: "pytorch_zoo.dpn",
    CatBnAct: "pytorch_zoo.dpn",
    ConvBottleneck: "pytorch_zoo.abstract_model",
    UnetDecoderBlock: "pytorch_zoo.abstract_model",
}
for _cls, _mod in _ORIGIN_MODULE.items():
    _cls.__module__ = _mod

_PUBLIC_OF = {
    net.DPNUnet: DPNUnet,
    net.DualPathBlock: DualPathBlock,
    net.BnActConv2d: BnActConv2d,
    net.CatBnAct: CatBnAct,
    net.ConvBottleneck: ConvBottleneck,
    net.UnetDecoderBlock: UnetDecoderBlock,
}
_ZOO_MODULES = ("pytorch_zoo", "pytorch_zoo.unet", "pytorch_zoo.dpn", "pytorch_zoo.abstract_model")


def _zoo_loaded() -> bool:
    return any(name == "pytorch_zoo" or name.startswith("pytorch_zoo.") for name in sys.modules)


@contextlib.contextmanager
def fake_modules(classes: Dict[str, Dict[str, Any]]) -> Iterator[None]:
    """Register modules ``{module name: {attr: value}}`` in sys.modules for the block."""
    assert not _zoo_loaded(), "a real pytorch_zoo is loaded; these tests need it absent"
    mods = {}
    for name, attrs in classes.items():
        mod = types.ModuleType(name)
        mod.__file__ = __file__
        mod.__dict__.update(attrs)
        mods[name] = mod
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name in mods:
            sys.modules.pop(name, None)


def public_zoo() -> contextlib.AbstractContextManager:
    attrs: Dict[str, Dict[str, Any]] = {name: {} for name in _ZOO_MODULES}
    for cls, mod in _ORIGIN_MODULE.items():
        attrs[mod][cls.__name__] = cls
    return fake_modules(attrs)


def save_public(obj: Any, path: Path, fmt: str = "zip") -> Path:
    """torch.save with the pytorch_zoo look-alikes importable; ``fmt`` zip or legacy."""
    with public_zoo():
        torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    assert not _zoo_loaded()
    return path


def to_public(module: nn.Module) -> nn.Module:
    """The same tree (sharing tensors) with our network classes swapped for the look-alikes."""
    cls = _PUBLIC_OF.get(type(module), type(module))
    assert cls.__module__.startswith(("pytorch_zoo.", "torch.nn.modules.")), cls
    clone = cls.__new__(cls)
    clone.__dict__.update(module.__dict__)
    clone.__dict__["_modules"] = OrderedDict(
        (name, None if child is None else to_public(child)) for name, child in module._modules.items()
    )
    return clone


def data_parallel(module: nn.Module) -> nn.Module:
    """DataParallel as saved from a GPU job (on CPU torch leaves the device fields out)."""
    dp = nn.DataParallel(module)
    dp.device_ids, dp.output_device, dp.src_device_obj = [0], 0, torch.device("cuda", 0)
    return dp


def _randomise(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))


def small_public_tree() -> nn.Module:
    """A few-kilobyte module tree with the public classes and attribute names."""
    torch.manual_seed(5)
    relu = nn.ReLU(inplace=True)  # pytorch_zoo shares one ReLU instance

    def bac(i: int, o: int, k: int) -> nn.Module:
        conv = nn.Conv2d(i, o, k, padding=k // 2, bias=False)
        return BnActConv2d(bn=nn.BatchNorm2d(i, eps=1e-3), act=relu, conv=conv)

    def dec(i: int, o: int) -> nn.Module:
        layer = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(i, o, 3, padding=1), relu)
        return UnetDecoderBlock(layer=layer)

    tree = DPNUnet(
        bottlenecks=nn.ModuleList([ConvBottleneck(seq=nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), relu))]),
        decoder_stages=nn.ModuleList([dec(10, 4)]),
        last_upsample=dec(4, 4),
        final=nn.Sequential(nn.Conv2d(4, 3, 3, padding=1)),
        encoder_stages=nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3), relu),
                nn.Sequential(
                    nn.MaxPool2d(3, 2, 1),
                    DualPathBlock(
                        c1x1_w_s1=bac(4, 8, 1), c1x1_a=bac(4, 4, 1), c3x3_b=bac(4, 4, 3), c1x1_c=bac(4, 6, 1)
                    ),
                    CatBnAct(bn=nn.BatchNorm2d(10, eps=1e-3), act=relu),
                ),
            ]
        ),
    )
    tree.register_buffer("scratch", torch.ones(2), persistent=False)  # not in a state dict
    base = torch.arange(24.0).reshape(4, 6)
    tree.register_buffer("base", base)
    tree.register_buffer("view", base[1:, ::2])  # shares base's storage: offset 6, strides (6, 2)
    _randomise(tree, 6)
    return tree


def assert_same_state(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def small_tree() -> nn.Module:
    return small_public_tree()


@pytest.fixture(scope="module")
def small_files(small_tree: nn.Module, tmp_path_factory) -> Dict[str, Path]:
    """The small tree saved every way the public files may come."""
    folder = tmp_path_factory.mktemp("small")
    sd = small_tree.state_dict()
    files = {}
    for fmt in ("zip", "legacy"):
        files[f"module-{fmt}"] = save_public(small_tree, folder / f"module-{fmt}.pth", fmt)
        files[f"dp-{fmt}"] = save_public(data_parallel(small_tree), folder / f"dp-{fmt}.pth", fmt)
        files[f"sd-{fmt}"] = save_public(sd, folder / f"sd-{fmt}.pth", fmt)
    torch.save(OrderedDict(("module." + k, v) for k, v in sd.items()), folder / "sd-prefixed.pth")
    files["sd-prefixed"] = folder / "sd-prefixed.pth"
    prefixed = OrderedDict(("module." + k, v) for k, v in sd.items())
    torch.save({"state_dict": prefixed, "epoch": 3}, folder / "nested.pth")
    files["sd-nested"] = folder / "nested.pth"
    return files


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize(
    "kind", ["module-zip", "module-legacy", "dp-zip", "dp-legacy", "sd-zip", "sd-legacy", "sd-prefixed", "sd-nested"]
)
def test_read_weight_file_every_format(kind: str, small_files, small_tree) -> None:
    assert not _zoo_loaded()
    assert_same_state(read_weight_file(small_files[kind]), small_tree.state_dict())
    assert not _zoo_loaded()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_modules_come_back_as_inert_records(fmt: str, small_files) -> None:
    root = restricted_load(small_files[f"dp-{fmt}"])
    assert isinstance(root, StandIn) and not isinstance(root, nn.Module)
    assert root.origin == "torch.nn.parallel.data_parallel.DataParallel"
    unet = root.state["_modules"]["module"]
    assert unet.origin == "pytorch_zoo.unet.DPNUnet"
    block = unet.state["_modules"]["encoder_stages"].state["_modules"]["1"].state["_modules"]["1"]
    assert block.origin == "pytorch_zoo.dpn.DualPathBlock"
    assert block.state["_modules"]["c3x3_b"].origin == "pytorch_zoo.dpn.BnActConv2d"
    assert root.state["src_device_obj"] == "device('cuda', 0)"  # recorded, not built


def test_plain_state_dicts_use_weights_only_load(small_files, small_tree, monkeypatch) -> None:
    def refuse(path):
        raise AssertionError("restricted loader used for a plain state dict")

    monkeypatch.setattr(weights_mod, "restricted_load", refuse)
    for kind in ("sd-zip", "sd-legacy", "sd-nested"):
        assert_same_state(read_weight_file(small_files[kind]), small_tree.state_dict())


def test_installed_pytorch_zoo_is_never_used(small_files, small_tree, tmp_path) -> None:
    """Even with a (booby-trapped) pytorch_zoo importable, its classes are not touched."""
    marker = tmp_path / "zoo_code_ran"

    class Trap:
        def __new__(cls, *args, **kwargs):
            marker.touch()
            return object.__new__(cls)

        def __setstate__(self, state):
            marker.touch()

    attrs = {name: {} for name in _ZOO_MODULES}
    for cls, mod in _ORIGIN_MODULE.items():
        attrs[mod][cls.__name__] = Trap
    with fake_modules(attrs):
        state = read_weight_file(small_files["module-zip"])
        state_legacy = read_weight_file(small_files["module-legacy"])
    assert not marker.exists()
    assert_same_state(state, small_tree.state_dict())
    assert_same_state(state_legacy, small_tree.state_dict())


# --------------------------------------------------------------------------- refusals
class _Payload:
    """Pickles as ``fn(*args)``: what a malicious weight file would run on load."""

    def __init__(self, fn: Any, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> Dict[str, _Payload]:
    return {
        f"{os.system.__module__}.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
        "torch.serialization.save": _Payload(torch.save, ({"x": 1}, str(marker))),
    }


@pytest.mark.parametrize("where", ["top", "in-tree-zip", "in-tree-legacy", "raw-pickle"])
@pytest.mark.parametrize("name", ["system", "builtins.eval", "subprocess.Popen", "torch.serialization.save"])
def test_code_in_the_pickle_is_refused_before_it_runs(name: str, where: str, tmp_path) -> None:
    marker = tmp_path / "pwned"
    name = f"{os.system.__module__}.system" if name == "system" else name
    payload = _payloads(marker)[name]
    path = tmp_path / f"evil-{where}.pth"
    if where == "top":
        save_public({"state_dict": payload}, path)
    elif where == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        tree = small_public_tree()
        tree.encoder_stages[1][1].c3x3_b.conv.__dict__["hook"] = payload  # deep in the tree
        save_public(tree, path, "zip" if where == "in-tree-zip" else "legacy")
    with pytest.raises(WeightFileError) as info:
        load_hpa_unet(path)
    message = str(info.value)
    assert f"'{name}'" in message and str(path) in message and "\n" not in message, message
    assert not marker.exists()


def test_refusal_names_unknown_module_class(tmp_path) -> None:
    tree = small_public_tree()
    tree.extra = nn.Linear(2, 2)  # a real torch module class, but not one of the allowed
    path = save_public(tree, tmp_path / "linear.pth")
    with pytest.raises(WeightFileError, match=r"'torch\.nn\.modules\.linear\.Linear'"):
        read_weight_file(path)


class _Bare:
    """Pickles as a bare ``pytorch_zoo.dpn.CatBnAct()`` call, with no state."""

    def __reduce__(self):
        return CatBnAct, ()


def test_malformed_module_records(tmp_path) -> None:
    path = save_public({"model": _Bare()}, tmp_path / "bare.pth")
    with pytest.raises(WeightFileError, match="CatBnAct at '<root>' has no state"):
        read_weight_file(path)
    tree = small_public_tree()
    tree.final[0]._parameters["weight"] = "not a tensor"
    path = save_public(tree, tmp_path / "str.pth", "legacy")
    with pytest.raises(WeightFileError, match="non-tensor entry final.0.weight"):
        read_weight_file(path)
    tree = small_public_tree()
    tree.final._modules["0"] = {"weight": torch.zeros(1)}
    path = save_public(tree, tmp_path / "dict.pth")
    with pytest.raises(WeightFileError, match="submodule final.0 of torch.nn.modules.container.Sequential"):
        read_weight_file(path)


# --------------------------------------------------------------------------- wrong files
def _fake_dpn_state(
    drop: int = 0, wrong: str | None = None, counters: bool = True
) -> "OrderedDict[str, torch.Tensor]":
    """DPNUnet-shaped zeros that cost nothing: each tensor a stride-0 view of one number."""
    state = OrderedDict()
    for i, (key, shape) in enumerate(expected_state_dict_shapes().items()):
        if i < drop or (not counters and key.endswith("num_batches_tracked")):
            continue
        if key == wrong:
            shape = (shape[0] + 2,) + shape[1:]
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state[key] = torch.zeros((), dtype=dtype).expand(shape)
    return state


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(WeightFileError) as info:
        load_hpa_unet(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file_and_directory(tmp_path) -> None:
    _expect_error(tmp_path / "nope.pth", "no such file")
    _expect_error(tmp_path, "not a regular file")


def test_empty_text_and_random_files(tmp_path) -> None:
    (tmp_path / "empty.pth").write_bytes(b"")
    _expect_error(tmp_path / "empty.pth", "empty file")
    (tmp_path / "text.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    _expect_error(tmp_path / "text.pth", "not a PyTorch weight file")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.pth").write_bytes(b"\x13" + noise)
    _expect_error(tmp_path / "noise.pth", "not a PyTorch weight file")
    (tmp_path / "noise-pickle.pth").write_bytes(b"\x80\x02" + noise)
    _expect_error(tmp_path / "noise-pickle.pth", "cannot be unpickled")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated_files(fmt: str, small_files, tmp_path) -> None:
    data = small_files[f"module-{fmt}"].read_bytes()
    for cut in (len(data) // 2, len(data) - 200):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        _expect_error(path, "truncated or corrupt")


def test_torchscript_archive_is_refused(tmp_path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)), path)
    _expect_error(path, "TorchScript")


def test_classifier_checkpoint_is_not_a_unet(tmp_path) -> None:
    classifier = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 19))
    meta = {"backbone": "resnet10t", "num_classes": 19}
    torch.save({"state_dict": classifier.state_dict(), "meta": meta}, tmp_path / "c.pt")
    _expect_error(
        tmp_path / "c.pt",
        "not an hpacellseg DPN U-Net",
        "missing 595 of 595 keys",
        "9 unexpected keys, e.g. '0.weight'",
    )


def test_wrong_keys_and_shapes(tmp_path) -> None:
    torch.save(_fake_dpn_state(drop=12), tmp_path / "missing.pth")
    _expect_error(tmp_path / "missing.pth", "missing 12 of 595 keys, e.g. 'bottlenecks.0.seq.0.weight'")
    torch.save(_fake_dpn_state(wrong="final.0.weight"), tmp_path / "shape.pth")
    _expect_error(
        tmp_path / "shape.pth",
        "wrong shape for 1 tensor,",
        "'final.0.weight' is (5, 64, 3, 3) in the file, (3, 64, 3, 3)",
    )
    extra = _fake_dpn_state()
    extra["final.1.weight"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    _expect_error(tmp_path / "extra.pth", "1 unexpected key, e.g. 'final.1.weight'")


def test_files_without_a_state_dict(tmp_path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "dict.pth")
    _expect_error(tmp_path / "dict.pth", "no state dict in it", "'epoch'")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    _expect_error(tmp_path / "list.pth", "holds a list")


def test_counters_missing_from_old_files_are_filled(tmp_path) -> None:
    torch.save(_fake_dpn_state(counters=False), tmp_path / "old.pth")
    model = load_hpa_unet(tmp_path / "old.pth")
    assert isinstance(model, net.DPNUnet) and not model.training
    assert int(model.encoder_stages[0][1].num_batches_tracked) == 0
    assert all(p.is_contiguous() for p in model.parameters())


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def source() -> net.DPNUnet:
    torch.manual_seed(11)
    model = net.build_dpn_unet().eval()
    _randomise(model, 12)
    return model


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(13))


@pytest.fixture(scope="module")
def source_out(source: net.DPNUnet, x32: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return source(x32)


def _check_loaded(path: Path, source: net.DPNUnet, x32: torch.Tensor, source_out: torch.Tensor) -> None:
    try:
        model = load_hpa_unet(path, device=torch.device("cpu"))
    finally:
        path.unlink()  # ~560 MB each
    assert type(model) is net.DPNUnet and not model.training
    assert_same_state(model.state_dict(), source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x32), source_out, rtol=1e-6, atol=1e-6)


def test_public_module_file_zip(source, x32, source_out, tmp_path) -> None:
    public = to_public(source)
    assert type(public).__module__ == "pytorch_zoo.unet"
    path = save_public(public, tmp_path / "dpn_unet_cell_3ch_v1.pth", "zip")
    _check_loaded(path, source, x32, source_out)


@pytest.mark.slow
def test_public_module_file_legacy_dataparallel(source, x32, source_out, tmp_path) -> None:
    path = save_public(data_parallel(to_public(source)), tmp_path / "dpn_unet_nuclei_v1.pth", "legacy")
    _check_loaded(path, source, x32, source_out)


@pytest.mark.slow
def test_plain_state_dict_dataparallel_prefix(source, x32, source_out, tmp_path) -> None:
    path = tmp_path / "state_dict.pth"
    torch.save(OrderedDict(("module." + k, v) for k, v in source.state_dict().items()), path)
    _check_loaded(path, source, x32, source_out)
