"""Choosing the torch device: CUDA only where this torch can actually run on the card.

The case in point is Kaggle's P100 (Pascal, ``sm_60``): torch builds for CUDA 12.8 and
later carry no Pascal kernels, so ``torch.cuda.is_available()`` is ``True`` while every
CUDA operation fails with "no kernel image is available for execution on the device".
Without a check each image would fail on its own and the run would end with empty rows.
:func:`resolve_device` finds this once, at start-up: ``auto`` falls back to the CPU with a
warning; an explicit ``cuda`` request is refused with the reason.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["DeviceError", "arch_supported", "cuda_problem", "resolve_device", "CUDA_HINT"]

CUDA_HINT = (
    "choose a GPU this torch supports (on Kaggle: T4 or L4 instead of P100, whose Pascal "
    "kernels the current image's torch lacks) or install a torch built for this card"
)

_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)[a-z]?$")


class DeviceError(RuntimeError):
    """The device asked for cannot run the models."""


def _first_line(e: BaseException) -> str:
    """An exception's first message line (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch built for ``arch_list`` has code for a card of ``capability``.

    Args:
        capability: ``(major, minor)``, e.g. ``(6, 0)`` for a P100.
        arch_list: ``torch.cuda.get_arch_list()``, e.g. ``["sm_70", "sm_90", "compute_90"]``.

    Binary code ``sm_XY`` runs on cards of the same major ``X`` with minor ``>= Y``; PTX
    ``compute_XY`` is compiled by the driver for any card ``>= X.Y``. An empty list (torch
    could not tell) counts as supported: the probe in :func:`cuda_problem` decides then.
    """
    entries = [m.groups() for m in (_ARCH_RE.match(a.strip()) for a in arch_list) if m]
    if not entries:
        return True
    major, minor = capability
    for kind, hi, lo in entries:
        arch = (int(hi), int(lo))
        if kind == "sm" and arch[0] == major and arch[1] <= minor:
            return True
        if kind == "compute" and arch <= (major, minor):
            return True
    return False


def _probe(device) -> None:
    """A tiny fp16 convolution on ``device``, synchronised (raises where kernels are missing)."""
    import torch
    import torch.nn.functional as F

    x = torch.ones(1, 4, 8, 8, device=device)
    w = torch.ones(2, 4, 3, 3, device=device)
    with torch.autocast("cuda", dtype=torch.float16):
        y = F.conv2d(x, w, padding=1)
    float(torch.sigmoid(y.float()).sum())


def cuda_problem(device: str = "cuda") -> str | None:
    """Why the CUDA ``device`` cannot run the models, or ``None`` when it can.

    Checks, in order: CUDA present; the device index exists; this torch has kernels for
    the card (:func:`arch_supported`); a tiny fp16 convolution runs.
    """
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU visible, or a CPU-only torch)"
    try:
        dev = torch.device(device)
        count = torch.cuda.device_count()
        index = dev.index if dev.index is not None else 0
        if index >= count:
            return f"{device} does not exist: {count} CUDA device(s) visible"
        name = torch.cuda.get_device_name(index)
        cap = tuple(torch.cuda.get_device_capability(index))
        arch = list(torch.cuda.get_arch_list())
    except Exception as e:  # a broken driver or a bad device string: say so, do not crash
        return f"{device}: CUDA cannot be queried: {_first_line(e)}"
    if not arch_supported(cap, arch):
        return (
            f"{name} (compute capability {cap[0]}.{cap[1]}) is not supported by this torch "
            f"{torch.__version__}, built for {' '.join(arch)}"
        )
    try:
        _probe(torch.device("cuda", index))
    except Exception as e:  # torch.AcceleratorError / RuntimeError, whatever the build raises
        return f"{name}: a test convolution failed on {device}: {_first_line(e)}"
    return None


def resolve_device(requested: str = "auto") -> tuple[str, str | None]:
    """The device to run on and a warning to report, from ``--device``.

    ``auto``: ``cuda`` when a usable GPU is there, else ``cpu`` (with a warning when a GPU
    is visible but unusable). ``cuda`` / ``cuda:N``: that device, or :class:`DeviceError`
    saying why not. ``cpu`` as is; another torch device (``mps``...) if a tensor can be put
    there; a name torch does not know (``tpu``, ``cuda:x``) is a :class:`DeviceError`.
    """
    import torch

    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu", None
        problem = cuda_problem("cuda")
        if problem is None:
            return "cuda", None
        msg = f"the GPU cannot be used, running on the CPU (much slower): {problem}; {CUDA_HINT}"
        logger.error(msg)
        return "cpu", msg
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError) as e:
        raise DeviceError(f"--device {requested}: not a device torch knows ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        problem = cuda_problem(requested)
        if problem is not None:
            raise DeviceError(f"--device {requested}: {problem}; {CUDA_HINT} (or use --device auto/cpu)")
    elif dev.type != "cpu":  # mps, xpu...: can this torch put a tensor there?
        try:
            float((torch.ones(1, device=dev) + 1).sum())
        except Exception as e:
            raise DeviceError(f"--device {requested}: this torch cannot use it ({_first_line(e)}); use auto, cpu or cuda") from None
    return requested, None
