"""Device choice: a visible GPU this torch cannot run on (Kaggle's P100 with a cu128 torch)
falls back to the CPU under ``auto`` and is refused when asked for by name. CUDA is faked
here (this machine has none); the arch rule is checked on the real arch lists of torch
builds."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from hpa_kernel.config import load_config
from hpa_kernel.run.device import DeviceError, arch_supported, cuda_problem, resolve_device
from hpa_kernel.run.options import RunOptions
from hpa_kernel.run.pipeline import run
from hpa_kernel.formats.submission import validate_submission
from hpa_kernel.submit import main

CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize(
    "cap, arch, ok",
    [
        ((6, 0), CU128, False),  # P100 with a CUDA 12.8 build: no Pascal kernels
        ((6, 0), CU126, True),
        ((7, 5), CU128, True),  # T4
        ((6, 1), ["sm_60"], True),  # same major, higher minor runs sm_60 code
        ((7, 5), ["sm_80"], False),  # binary code never runs on an older card
        ((8, 9), ["sm_86"], True),
        ((9, 0), ["compute_80"], True),  # PTX is compiled by the driver for newer cards
        ((7, 0), ["compute_80"], False),
        ((9, 0), ["sm_90a"], True),
        ((12, 0), ["sm_120", "compute_120"], True),
        ((6, 0), [], True),  # unknown: the probe decides
    ],
)
def test_arch_supported(cap, arch, ok):
    assert arch_supported(cap, arch) is ok


def fake_cuda(monkeypatch, *, available=True, count=1, cap=(6, 0), arch=CU128, probe_error=None):
    """Pretend a CUDA card is there; ``probe_error`` is raised by the first tensor put on it
    (``calls``: the CUDA devices tensors were put on)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB" if cap == (6, 0) else "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch))

    real_ones = torch.ones

    def ones(*a, device=None, **kw):  # the card: a tensor put on it runs on the CPU, or fails
        if device is None or torch.device(device).type != "cuda":
            return real_ones(*a, device=device, **kw)
        calls.append(str(device))
        if probe_error is not None:
            raise probe_error
        return real_ones(*a, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    return calls


def test_no_cuda(monkeypatch):
    fake_cuda(monkeypatch, available=False)
    assert resolve_device("auto") == ("cpu", None)
    assert resolve_device("cpu") == ("cpu", None)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_p100_with_a_cu128_torch_falls_back_or_is_refused(monkeypatch):
    calls = fake_cuda(monkeypatch, cap=(6, 0), arch=CU128)
    dev, warning = resolve_device("auto")
    assert dev == "cpu"
    assert "P100" in warning and "compute capability 6.0" in warning and "T4" in warning
    with pytest.raises(DeviceError, match="not supported by this torch"):
        resolve_device("cuda")
    assert calls == []  # the arch list already said no: nothing launched on the card


def test_a_failing_test_convolution_is_caught(monkeypatch):
    err = RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors ...")
    calls = fake_cuda(monkeypatch, cap=(7, 5), arch=[], probe_error=err)
    problem = cuda_problem("cuda")
    assert problem.endswith("no kernel image is available for execution on the device")
    assert calls == ["cuda:0"]  # the test convolution ran on the card, and failed there
    assert resolve_device("auto")[0] == "cpu"


def test_usable_gpu_and_missing_index(monkeypatch):
    calls = fake_cuda(monkeypatch, cap=(7, 5), arch=CU128)
    assert resolve_device("auto") == ("cuda", None)
    assert calls and set(calls) == {"cuda:0"}  # usable only once the test convolution ran there
    assert resolve_device("cuda:0") == ("cuda:0", None)
    with pytest.raises(DeviceError, match="does not exist: 1 CUDA device"):
        resolve_device("cuda:3")


def test_pipeline_runs_on_the_cpu_and_says_why(monkeypatch, small_dataset, tiny_manifest, tmp_path):
    fake_cuda(monkeypatch, cap=(6, 0), arch=CU128)
    out = tmp_path / "submission.csv"
    summary = run(load_config(tiny_manifest), RunOptions(data_dir=small_dataset, out=out, device="auto", progress=False))
    assert summary.device == "cpu" and summary.n_failed == 0
    assert any("GPU cannot be used" in w for w in summary.warnings)
    assert "GPU cannot be used" in summary.format()
    assert validate_submission(out, small_dataset / "sample_submission.csv") == []
    assert len(pd.read_csv(out)) == len(pd.read_csv(small_dataset / "sample_submission.csv"))


def test_cli_refuses_an_unusable_cuda_by_name(monkeypatch, small_dataset, tiny_manifest, tmp_path, capsys):
    fake_cuda(monkeypatch, cap=(6, 0), arch=CU128)
    out = tmp_path / "submission.csv"
    rc = main(["--data-dir", str(small_dataset), "--weights", str(tiny_manifest), "--out", str(out),
               "--device", "cuda", "--no-progress", "-q"])
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--device cuda" in err and "not supported by this torch" in err


def test_a_broken_driver_is_reported_not_raised(monkeypatch):
    fake_cuda(monkeypatch, cap=(7, 5), arch=CU128)

    def broken(i=0):
        raise RuntimeError("CUDA driver initialization failed\nmore")

    monkeypatch.setattr(torch.cuda, "get_device_capability", broken)
    assert cuda_problem("cuda") == "cuda: CUDA cannot be queried: CUDA driver initialization failed"
    assert resolve_device("auto")[0] == "cpu"
    assert "cannot be queried" in cuda_problem("cuda:x")  # a bad device string, same way


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(DeviceError, match="not a device torch knows"):
        resolve_device(name)


def test_a_known_but_unusable_device_is_refused(monkeypatch):
    real = torch.ones

    def ones(*a, device=None, **kw):
        if device is not None and torch.device(device).type == "xpu":
            raise RuntimeError("PyTorch is not linked with support for xpu devices\nmore")
        return real(*a, device=device, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    with pytest.raises(DeviceError, match="this torch cannot use it .PyTorch is not linked with support for xpu devices.;"):
        resolve_device("xpu")
