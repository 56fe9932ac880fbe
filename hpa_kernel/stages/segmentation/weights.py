"""Load the public hpacellseg U-Net weight files without running code from them.

``dpn_unet_nuclei_v1.pth`` and ``dpn_unet_cell_3ch_v1.pth`` are whole pickled
``pytorch_zoo.unet.DPNUnet`` modules (``docs/METHOD.md``, "Segmentation"), possibly wrapped in
``torch.nn.DataParallel``, in torch's zip or legacy (non-zip) format. ``pytorch_zoo`` is
not installable and a plain ``torch.load`` of such a file would import and run whatever
the pickle names. This module instead reads them with a *restricted unpickler*:

* the module classes the files name (:data:`STAND_IN_CLASSES`) become inert
  :class:`StandIn` records of their pickled ``__dict__`` (``_parameters``, ``_buffers``,
  ``_modules``, ...); nothing of theirs runs;
* tensors are rebuilt from their storages by small checked equivalents of
  ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` (no hooks kept);
  ``collections.OrderedDict`` and ``set`` are the real ones;
* **any other global** (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an unknown
  ``torch`` function, ...) stops the unpickling at the opcode that names it, before
  anything is called, with :class:`WeightFileError` naming the global.

The byte-level formats (zip: ``archive/data.pkl`` + ``archive/data/<key>``; legacy: magic
number, protocol, system info, the object, the storage keys, the raw storages) are left
to ``torch.load``, which accepts a ``pickle_module``: ours only exposes the restricted
``Unpickler`` and ``load`` (so its storage handling is torch's own ``persistent_load``).

The stand-in tree is then walked into a state dict (dotted names, DataParallel's
``module.`` stripped) and loaded strictly into our :class:`~.network.DPNUnet`.
Plain state-dict files (``torch.save(model.state_dict())``, optionally under a
``"state_dict"`` key or ``module.``-prefixed) are read with
``torch.load(weights_only=True)`` first. Every failure is a :class:`WeightFileError`
whose one-line message names the file and the problem.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from hpa_kernel.stages.segmentation.network import DPNUnet, build_dpn_unet, expected_state_dict_shapes

__all__ = [
    "WeightFileError",
    "StandIn",
    "STAND_IN_CLASSES",
    "ALLOWED_GLOBALS",
    "load_hpa_unet",
    "read_weight_file",
    "restricted_load",
    "stand_in_state_dict",
]

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Dict[str, torch.Tensor]  # ordered: the keys come in state_dict() order


class WeightFileError(Exception):
    """A segmentation weight file is missing, unreadable, unsafe or of the wrong kind."""


class _DisallowedGlobal(pickle.UnpicklingError):
    """Raised by the restricted unpickler for a global outside :data:`ALLOWED_GLOBALS`.

    ``name`` is ``module.name`` as the pickle spells it; ``alias`` the Python 3 spelling
    where that differs (protocol-2 pickles write ``__builtin__.eval`` for ``builtins.eval``).
    """

    def __init__(self, module: Any, name: Any) -> None:
        self.name = f"{module}.{name}"
        py3 = _compat_pickle.NAME_MAPPING.get((module, name))
        if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
            py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
        self.alias = None if py3 is None else f"{py3[0]}.{py3[1]}"
        super().__init__(f"global {self.name!r} is not allowed in a weight file")

    def describe(self) -> str:
        return f"'{self.name}'" + (f" (= '{self.alias}')" if self.alias else "")


class _BadContent(Exception):
    """The file unpickled, but what it holds is not a set of named tensors."""


# --------------------------------------------------------------------------- stand-ins
class StandIn:
    """Inert record of a pickled module of an allowed class.

    Unpickling creates it without ``__init__`` and hands it the pickled ``__dict__``;
    that is kept, untouched, in :attr:`state` (not merged into the instance, so no
    attribute of the record can be replaced by the file). ``origin`` is the dotted name
    the pickle used for the class.
    """

    origin: str = "?"
    state: Any = None  # stays None for a record the pickle gave no state
    args: Tuple[Any, ...] = ()
    # torch's legacy loader reads this when a class's saved source differs from ours.
    dump_patches = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # only for REDUCE-style pickles
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<StandIn {self.origin}>"


STAND_IN_CLASSES: Tuple[str, ...] = (
    "pytorch_zoo.unet.DPNUnet",
    "pytorch_zoo.dpn.DualPathBlock",
    "pytorch_zoo.dpn.BnActConv2d",
    "pytorch_zoo.dpn.CatBnAct",
    "pytorch_zoo.abstract_model.ConvBottleneck",
    "pytorch_zoo.abstract_model.UnetDecoderBlock",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.parallel.data_parallel.DataParallel",
)
"""Module classes a weight file may name; each becomes its own :class:`StandIn` subclass."""


def _make_stand_in(origin: str) -> type:
    name = origin.rpartition(".")[2]
    return type(name, (StandIn,), {"origin": origin, "__module__": __name__, "__qualname__": f"StandIn[{origin}]"})


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """Checked ``torch._utils._rebuild_tensor_v2``: a CPU tensor view of ``storage``;
    ``requires_grad``, hooks and metadata are dropped (we only want the numbers)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _BadContent(f"tensor record without a storage (got {type(storage).__name__})")
    if not _is_int(storage_offset) or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise _BadContent("tensor record with a malformed offset, size or stride")
    if len(size) != len(stride):
        raise _BadContent("tensor record whose size and stride differ in length")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    """Checked ``torch._utils._rebuild_parameter``: the plain tensor, no hooks."""
    if not isinstance(data, torch.Tensor):
        raise _BadContent(f"parameter record without a tensor (got {type(data).__name__})")
    return data


class _StorageTypeRecord:
    """What a storage class name means in a persistent id: only its dtype is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _device_record(*args: Any) -> str:
    """Inert ``torch.device(...)`` (DataParallel keeps one): recorded as text only."""
    return "device(" + ", ".join(repr(a) for a in args) + ")"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_tuple(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(_is_int(i) for i in v)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "LongStorage": torch.int64,
    "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64,
}

ALLOWED_GLOBALS: Dict[Tuple[str, str], Any] = {
    **{tuple(o.rsplit(".", 1)): _make_stand_in(o) for o in STAND_IN_CLASSES},  # type: ignore[misc]
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 pickles spell builtins the Python 2 way
    ("torch", "device"): _device_record,
    **{("torch", name): _StorageTypeRecord(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}
"""``(module, name)`` -> what the restricted unpickler returns for that global. Nothing
else resolves. (Inside ``torch.load`` torch itself maps ``*Storage`` names to dtypes
before asking us; the storage entries make :func:`restricted_load` complete on its own.)"""


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` knows only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise _DisallowedGlobal(module, name) from None


def _restricted_pickle_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# The ``pickle_module`` handed to torch.load: torch subclasses ``Unpickler`` (adding its
# storage handling) and calls ``load`` for the legacy format's small header pickles.
_restricted_pickle = types.ModuleType("hpa_kernel_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_pickle_load  # type: ignore[attr-defined]
_restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- reading
def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sniff(path: Path) -> str:
    """``"zip"`` or ``"pickle"`` from the first bytes; WeightFileError for anything else."""
    if not path.exists():
        raise WeightFileError(f"{path}: no such file")
    if not path.is_file():
        raise WeightFileError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise WeightFileError(f"{path}: cannot be read ({_one_line(exc)})") from None
    if not head:
        raise WeightFileError(f"{path}: empty file")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise WeightFileError(f"{path}: truncated or corrupt zip archive ({_one_line(exc)})") from None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise WeightFileError(f"{path}: a TorchScript archive, not a torch.save weight file")
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            raise WeightFileError(f"{path}: a zip archive without data.pkl, not a torch.save weight file")
        return "zip"
    if head[0] == 0x80:  # pickle PROTO opcode: torch's legacy format starts with one
        return "pickle"
    raise WeightFileError(
        f"{path}: not a PyTorch weight file (neither a torch.save zip archive nor a pickle; "
        f"starts with {head[:8]!r})"
    )


def restricted_load(path: PathLike) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy) with the restricted unpickler.

    Module objects come back as :class:`StandIn` trees, tensors as CPU tensors.
    Raises :class:`WeightFileError` for a disallowed global (naming it) or an unreadable file.
    """
    path = Path(path)
    _sniff(path)
    try:
        with warnings.catch_warnings():
            # legacy files carry each class's source; ours differs (SourceChangeWarning)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle, weights_only=False)
    except _DisallowedGlobal as exc:
        raise WeightFileError(
            f"{path}: refused: the pickle names the global {exc.describe()}, which a weight file may "
            "not use (only the hpacellseg module classes, tensors and plain containers are allowed)"
        ) from None
    except _BadContent as exc:
        raise WeightFileError(f"{path}: malformed content ({exc})") from None
    except Exception as exc:  # truncated/corrupt data: EOFError, UnpicklingError, RuntimeError...
        raise WeightFileError(
            f"{path}: cannot be unpickled, the file may be truncated or corrupt "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def _walk(node: StandIn, prefix: str, out: StateDict, seen: List[int]) -> None:
    """Collect a stand-in module's parameters and persistent buffers, then its children's."""
    if id(node) in seen or len(seen) > 64:
        raise _BadContent(f"module tree at '{prefix or '<root>'}' is cyclic or too deep")
    state = node.state
    if not isinstance(state, Mapping):
        raise _BadContent(f"module record {node.origin} at '{prefix or '<root>'}' has no state")
    params = state.get("_parameters", {})
    buffers = state.get("_buffers", {})
    modules = state.get("_modules", {})
    non_persistent = state.get("_non_persistent_buffers_set", set())
    if not all(isinstance(m, Mapping) for m in (params, buffers, modules)):
        raise _BadContent(f"module record {node.origin} at '{prefix or '<root>'}' is malformed")
    for group, skip in ((params, ()), (buffers, non_persistent)):
        for name, value in group.items():
            if value is None or name in skip:
                continue
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise _BadContent(f"non-tensor entry {prefix}{name!s} in {node.origin}")
            out[prefix + name] = value
    seen.append(id(node))
    for name, child in modules.items():
        if child is None:
            continue
        if not isinstance(name, str) or not isinstance(child, StandIn):
            raise _BadContent(f"submodule {prefix}{name!s} of {node.origin} is not a module record")
        _walk(child, f"{prefix}{name}.", out, seen)
    seen.pop()


def stand_in_state_dict(root: StandIn) -> StateDict:
    """The ``state_dict()`` the pickled module would have had (dotted names, in order)."""
    out: StateDict = OrderedDict()
    _walk(root, "", out, [])
    return out


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, depth: int = 0) -> StateDict:
    """A state dict from what a file held: a module record, a tensor dict, or a dict
    holding one of those under a usual key (``state_dict``, ``model``, ...)."""
    if isinstance(obj, StandIn):
        return stand_in_state_dict(obj)
    if _is_tensor_dict(obj):
        return OrderedDict(obj)
    if isinstance(obj, Mapping) and depth < 2:
        for key in _STATE_KEYS:
            if key in obj and (isinstance(obj[key], (StandIn, Mapping))):
                return _find_state_dict(obj[key], depth + 1)
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        raise _BadContent(f"a dict with keys {keys or 'none'} and no state dict in it")
    if isinstance(obj, nn.Module):  # pragma: no cover - cannot come out of our loaders
        return OrderedDict(obj.state_dict())
    raise _BadContent(f"holds a {type(obj).__name__}, not a module or a state dict")


def _strip_prefix(state: StateDict, prefix: str = "module.") -> StateDict:
    while state and all(k.startswith(prefix) for k in state):
        state = OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def read_weight_file(path: PathLike) -> StateDict:
    """The named tensors of a weight file, whatever its kind (model-agnostic).

    Tries ``torch.load(weights_only=True)`` (plain state dicts) and falls back on
    :func:`restricted_load` (whole pickled modules). DataParallel's ``module.`` prefix
    is stripped. Raises :class:`WeightFileError`.
    """
    path = Path(path)
    _sniff(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not plain tensors (or unreadable): the restricted loader decides
        obj = restricted_load(path)
    try:
        state = _find_state_dict(obj)
    except _BadContent as exc:
        raise WeightFileError(f"{path}: not a weight file of a network: {exc}") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:  # odd records
        raise WeightFileError(f"{path}: malformed module records ({_one_line(exc)})") from None
    return _strip_prefix(state)


# --------------------------------------------------------------------------- DPNUnet
def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _examples(keys: List[str], n: int = 2) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def _check_state(state: StateDict, path: Path) -> StateDict:
    """Keys and shapes against :class:`DPNUnet`, in its order; one-line errors."""
    expected = expected_state_dict_shapes()
    state = OrderedDict(state)
    missing = [k for k in expected if k not in state]
    if missing and all(k.endswith(".num_batches_tracked") for k in missing):
        # files from before torch 0.4.1 lack the BN counters (unused in eval): zeros
        for key in missing:
            state[key] = torch.zeros((), dtype=torch.long)
        missing = []
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} of {len(expected)} keys, e.g. {_examples(missing)}")
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'unexpected key')}, e.g. {_examples(unexpected)}")
        raise WeightFileError(f"{path}: not an hpacellseg DPN U-Net: " + "; ".join(parts))
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        k = wrong[0]
        raise WeightFileError(
            f"{path}: not an hpacellseg DPN U-Net: wrong shape for {_count(len(wrong), 'tensor')}, e.g. "
            f"{k!r} is {tuple(state[k].shape)} in the file, {expected[k]} in the network"
        )
    bad = [k for k in expected if not (state[k].is_floating_point() or k.endswith("num_batches_tracked"))]
    if bad:
        raise WeightFileError(f"{path}: non-floating-point tensors, e.g. {_examples(bad)} ({state[bad[0]].dtype})")
    return OrderedDict(
        (k, state[k].to(torch.long if k.endswith("num_batches_tracked") else torch.float32).contiguous())
        for k in expected
    )


def _network_from_state(state: StateDict) -> DPNUnet:
    """A DPNUnet holding ``state``: built on the meta device and the file's tensors assigned
    (no random init, no second copy of 139 M numbers)."""
    with torch.device("meta"):
        net = build_dpn_unet()
    net.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(net.parameters()) + list(net.buffers())):  # pragma: no cover
        raise RuntimeError("DPNUnet kept meta tensors after loading")
    return net


def load_hpa_unet(path: PathLike, device: Union[str, torch.device] = "cpu") -> DPNUnet:
    """An hpacellseg U-Net (nuclei or cell) from its weight file, in eval mode on ``device``.

    Accepts the public whole-module pickles (``dpn_unet_nuclei_v1.pth``,
    ``dpn_unet_cell_3ch_v1.pth``; zip or legacy format, DataParallel or not) and plain
    state dicts of the same network; loads them strictly into :class:`DPNUnet` without
    importing ``pytorch_zoo`` and without running code from the file.

    Raises:
        WeightFileError: missing or unreadable file, a global outside the allowed set,
            or tensors that are not those of the network (names the file and the problem).
    """
    path = Path(path)
    state = _check_state(read_weight_file(path), path)
    net = _network_from_state(state)
    return net.to(device).eval()
