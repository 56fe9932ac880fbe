"""Kaggle test layout: the sample CSV reader, the RGBY PNG reader (and the channel writer)
and the 512 px float image.

Layout (a sample is a submission with empty PredictionStrings: written by
:func:`hpa_kernel.formats.submission.write_submission`)::

    data_dir/sample_submission.csv     ID,ImageWidth,ImageHeight,PredictionString
    data_dir/test/<ID>_red.png         one plane each, 8- or 16-bit, any size
    data_dir/test/<ID>_green.png
    data_dir/test/<ID>_blue.png
    data_dir/test/<ID>_yellow.png

Reading is strict about what cannot be fixed (missing, empty, undecodable files, channels
of different sizes: :class:`ImageReadError`, one line naming the file and the fault) and
lenient, with a logged warning, about what can: a colour PNG where one plane is expected is
reduced to one plane, mixed 8/16-bit channels are brought to 16 bits, and a 16-bit image
whose values all fit in 0..255 is read as the 8-bit image it is.

Bounds, checked before anything is decoded:

* **IDs are names, never paths.** An ID becomes part of a file name only when it is a safe
  single name (:func:`is_safe_id`, the one rule: letters, digits, ``-``, ``_`` and ``.``,
  not starting with ``.``, at most :data:`MAX_ID_LENGTH` characters). Any other ID (``../x``,
  ``a/b``, ``/abs/x``, ``a\\b``, ``..``) is refused by :func:`channel_path` and
  :func:`id_file` with :class:`ImageReadError`, so nothing outside the folder is touched.
* **Only regular files are opened** (``stat`` first, ``S_ISREG``): a FIFO or a device where
  a PNG should be is refused as "not a regular file" instead of blocking the run.
* **A pixel cap** (``max_pixels``, :data:`DEFAULT_MAX_PIXELS`): a channel whose PNG header
  declares more pixels is refused from its header, naming its size and the cap.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from hpa_kernel.formats.atomic import atomic_write
from hpa_kernel.formats.csvfile import dict_reader, open_text
from hpa_kernel.stages.inputs import resize_rgby  # the kernel's pixels: one owner, re-exported for readers

__all__ = [
    "CHANNELS",
    "ImageReadError",
    "LoadedImage",
    "channel_path",
    "id_file",
    "is_safe_id",
    "MAX_ID_LENGTH",
    "DEFAULT_MAX_PIXELS",
    "fallback_size",
    "png_size",
    "SampleSubmission",
    "read_sample",
    "read_test_set",
    "read_channel",
    "write_channel",
    "read_rgby",
    "resize_rgby",
    "load_image",
]

logger = logging.getLogger(__name__)

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SAMPLE_NAME = "sample_submission.csv"
TEST_DIR = "test"


#: Longest ID used in a file name (``<ID>_yellow.png`` stays well under 255 bytes).
MAX_ID_LENGTH = 200
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")

#: Default pixel cap per channel (``--max-pixels``): 50 MP. Real HPA images are at most
#: 3072x3072 (9.4 MP); a 30000x30000 16-bit channel alone would need 1.8 GB to decode.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageReadError(Exception):
    """An image file cannot be read; the message names the file and the fault (one line)."""


def is_safe_id(image_id: str) -> bool:
    """Whether ``image_id`` may become part of a file name: the one rule for IDs as names.

    Safe: 1 to :data:`MAX_ID_LENGTH` characters out of ASCII letters, digits, ``-``, ``_``
    and ``.``, not starting with ``.`` (so never ``.``, ``..`` or a hidden file). Anything
    else (a separator ``/`` or ``\\``, an absolute path, a drive, a space, a control or
    non-ASCII character) is not a name but a path, and is never used as one.
    """
    return (isinstance(image_id, str) and 0 < len(image_id) <= MAX_ID_LENGTH
            and _SAFE_ID.fullmatch(image_id) is not None)


def _require_safe_id(image_id: str) -> None:
    if not is_safe_id(image_id):
        raise ImageReadError(
            f"ID {image_id!r} is not a safe file name (letters, digits, '-', '_', '.', not starting with '.'); "
            "nothing read or written for it"
        )


def id_file(folder: str | os.PathLike, image_id: str, suffix: str) -> Path:
    """``folder/<image_id><suffix>`` for a safe ID (:func:`is_safe_id`); raises
    :class:`ImageReadError` for any other, so the path never leaves ``folder``."""
    _require_safe_id(image_id)
    return Path(folder) / f"{image_id}{suffix}"


def _regular_size(path: Path) -> int:
    """``st_size`` of a regular file; :class:`ImageReadError` for a missing or non-regular
    one (a FIFO, a device, a folder: never opened, so never blocking)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: missing file") from None
    except OSError as e:
        raise ImageReadError(f"{path}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(f"{path}: not a regular file")
    return st.st_size


# ----------------------------------------------------------------------------------------
# The Kaggle layout
# ----------------------------------------------------------------------------------------


def _read_sample_rows(sample_path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """The rows (UTF-8, a byte-order mark allowed) and the line numbers of header lines
    repeated inside the file (skipped)."""
    with open_text(sample_path) as f:  # the one CSV rule (text that is not UTF-8: one line)
        reader = dict_reader(f)
        if reader.fieldnames is None or "ID" not in reader.fieldnames:
            raise ValueError(f"{sample_path}: no 'ID' column (header: {reader.fieldnames})")
        header = [h.strip() for h in reader.fieldnames]
        rows, repeated = [], []
        for row in reader:
            if [(row.get(h) or "").strip() for h in reader.fieldnames] == header:
                repeated.append(reader.line_num)
                continue
            rows.append(row)
    return rows, repeated


def _to_size(text: str | None) -> int:
    try:
        v = float(text) if text not in (None, "") else 0.0
    except ValueError:
        return 0
    return int(v) if np.isfinite(v) and v == int(v) and v > 0 else 0


@dataclass
class SampleSubmission:
    """What ``sample_submission.csv`` says: IDs in order (each once), sizes, repeated IDs."""

    ids: list[str]
    sizes: dict[str, tuple[int, int]]  # (width, height); 0 where missing or not positive
    duplicates: list[str]
    #: line numbers of the header line repeated inside the file (skipped, not an ID)
    repeated_headers: list[int] = field(default_factory=list)


def read_sample(sample_path: str | os.PathLike) -> SampleSubmission:
    """Read a sample submission once: IDs in its order (an ID listed twice is kept once,
    with a warning), ``{ID: (width, height)}`` (first of duplicates) and the repeated IDs.
    UTF-8 with or without a byte-order mark; a copy of the header line inside the file is
    skipped with a warning (``repeated_headers``).

    Raises ``ValueError`` (naming the file) without an ``ID`` column or for text that is
    not UTF-8.
    """
    sample_path = Path(sample_path)
    sizes: dict[str, tuple[int, int]] = {}
    duplicates: list[str] = []
    rows, repeated = _read_sample_rows(sample_path)
    if repeated:
        logger.warning("%s repeats its header line at line(s) %s; skipped", sample_path, repeated[:5])
    for row in rows:
        image_id = (row.get("ID") or "").strip()
        if not image_id:
            continue
        if image_id in sizes:
            duplicates.append(image_id)
            continue
        sizes[image_id] = (_to_size(row.get("ImageWidth")), _to_size(row.get("ImageHeight")))
    if duplicates:
        logger.warning("%s lists %d ID(s) more than once, kept once: %s", sample_path, len(duplicates), duplicates[:5])
    return SampleSubmission(ids=list(sizes), sizes=sizes, duplicates=duplicates, repeated_headers=repeated)


def read_test_set(data_dir: str | os.PathLike) -> tuple[list[str], SampleSubmission | None]:
    """Test image IDs of a Kaggle-layout folder and the sample they came from (``None``
    without one), reading ``sample_submission.csv`` once.

    In the order of ``data_dir/sample_submission.csv`` (an ID listed twice is kept once,
    with a warning); without a sample, the sorted IDs of the ``<ID>_<channel>.png`` files in
    ``data_dir/test`` (an ID missing some channel is kept, with a warning: loading it will
    report the missing file). Raises ``FileNotFoundError`` when neither gives any ID.
    """
    data_dir = Path(data_dir)
    sample_path = data_dir / SAMPLE_NAME
    if sample_path.is_file():
        sample = read_sample(sample_path)
        if not sample.ids:
            raise FileNotFoundError(f"{sample_path} has no IDs")
        return sample.ids, sample

    test_dir = data_dir / TEST_DIR
    found: dict[str, set[str]] = collections.defaultdict(set)
    if test_dir.is_dir():
        for entry in os.scandir(test_dir):
            stem, ext = os.path.splitext(entry.name)
            image_id, _, channel = stem.rpartition("_")
            if ext.lower() == ".png" and image_id and channel in CHANNELS:
                found[image_id].add(channel)
    if not found:
        raise FileNotFoundError(
            f"no test images in {data_dir}: expected {SAMPLE_NAME} or {TEST_DIR}/<ID>_{{{','.join(CHANNELS)}}}.png"
        )
    incomplete = sorted(i for i, chans in found.items() if len(chans) < len(CHANNELS))
    if incomplete:
        logger.warning("%d test ID(s) lack some channel files: %s", len(incomplete), incomplete[:5])
    logger.info("no %s in %s; using the %d IDs found in %s/", SAMPLE_NAME, data_dir, len(found), TEST_DIR)
    return sorted(found), None


# ----------------------------------------------------------------------------------------
# Reading one image
# ----------------------------------------------------------------------------------------


def png_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's header without decoding it; ``None`` if unreadable,
    not a PNG, or not a regular file (a FIFO is never opened)."""
    try:
        _regular_size(Path(path))
        with open(path, "rb") as f:
            head = f.read(24)
    except (OSError, ImageReadError):
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return (width, height) if width > 0 and height > 0 else None


def fallback_size(test_dir: str | os.PathLike, image_id: str, sample_sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Width and height for a row whose image was not (or could not be) decoded: the
    sample's where positive (:func:`read_sample` stores 0 for a missing size), else the
    first readable channel's PNG header (regular files only; none for an ID that is not a
    safe name, :func:`is_safe_id`), else ``(0, 0)``."""
    width, height = sample_sizes.get(image_id, (0, 0))
    if width > 0 and height > 0:
        return width, height
    if not is_safe_id(image_id):
        return (0, 0)
    for ch in CHANNELS:
        size = png_size(channel_path(test_dir, image_id, ch))
        if size is not None:
            return size
    return (0, 0)


def channel_path(folder: str | os.PathLike, image_id: str, channel: str) -> Path:
    """Path of one channel file: ``folder/<image_id>_<channel>.png``; raises
    :class:`ImageReadError` for an ID that is not a safe name (:func:`is_safe_id`)."""
    return id_file(folder, image_id, f"_{channel}.png")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: what other content under a ``.png`` name is, by its first bytes (for the message only)
_OTHER_FORMATS = ((b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
                  (b"GIF8", "GIF"), (b"RIFF", "RIFF/WebP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"))


def _require_png(path: Path) -> None:
    """:class:`ImageReadError` unless ``path`` starts with the PNG signature: only PNG is
    decoded, so the pixel cap (read from the PNG header) holds for every file decoded."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_PNG_SIGNATURE):
        return
    kind = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), "not an image format read here")
    raise ImageReadError(f"{path}: not a PNG file ({kind} data under a .png name); only PNG channel files are read")


def read_channel(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read one channel PNG as a 2-D uint8 or uint16 array.

    A colour PNG (3 or 4 planes; alpha is dropped) is reduced to one plane by the
    per-pixel **maximum** over its colour planes, with a warning. Max rather than luminance:
    for the usual case of identical planes both give the same image, and when the stain was
    saved into one colour plane only (others zero) max keeps its full intensity where a
    grayscale conversion would scale it by 0.299/0.587/0.114.

    Raises :class:`ImageReadError` for a missing, non-regular (FIFO, device, folder), empty
    or undecodable file, content that is not PNG (JPEG, TIFF... under a ``.png`` name: the
    pixel cap is read from the PNG header, so nothing else is decoded), an unsupported pixel
    type, or a PNG whose header declares more than ``max_pixels`` pixels (``None``: no cap;
    checked before decoding).
    """
    path = Path(path)
    nbytes = _regular_size(path)
    if nbytes == 0:
        raise ImageReadError(f"{path}: empty (0-byte) file")
    _require_png(path)
    if max_pixels is not None:
        size = png_size(path)
        if size is not None and size[0] * size[1] > max_pixels:
            raise ImageReadError(
                f"{path}: {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is over the pixel cap of "
                f"{max_pixels:,} (--max-pixels); not decoded"
            )
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"{path}: cannot decode ({nbytes} bytes; truncated or not an image)")
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    if img.ndim == 3:
        planes = img.shape[2]
        if planes == 1:
            img = img[:, :, 0]
        elif planes in (3, 4):
            colour = img[:, :, :3]
            logger.warning("%s: %d-plane PNG where one plane is expected; using the max over its colour planes",
                           path, planes)
            img = colour.max(axis=2)
        else:
            raise ImageReadError(f"{path}: unsupported number of planes {planes}")
    if img.ndim != 2 or img.size == 0:
        raise ImageReadError(f"{path}: decoded to an unusable shape {img.shape}")
    return img


def write_channel(path: str | os.PathLike, plane: np.ndarray) -> Path:
    """Write one channel PNG (atomically: a kill leaves the old file or none): a 2-D uint8 or
    uint16 array, fast compression (level 1); :func:`read_channel` reads it back unchanged."""
    if plane.ndim != 2 or plane.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: a channel is a 2-D uint8 or uint16 array, got {plane.dtype} {plane.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(plane), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path}")
    return atomic_write(path, buf.tobytes())


def _read_rgby(folder: str | os.PathLike, image_id: str, max_pixels: int | None) -> tuple[np.ndarray, list[str]]:
    """:func:`read_rgby` and the warnings it logged (one line each, naming the ID)."""
    paths = [channel_path(folder, image_id, ch) for ch in CHANNELS]  # the ID is checked first
    planes = [read_channel(p, max_pixels) for p in paths]
    ref = planes[0].shape
    for path, p in zip(paths, planes):
        if p.shape != ref:
            raise ImageReadError(
                f"{path}: size {p.shape[1]}x{p.shape[0]} differs from the red channel's {ref[1]}x{ref[0]}"
            )
    warnings: list[str] = []
    depths = {p.dtype for p in planes}
    if np.dtype(np.uint16) in depths and max(int(p.max()) for p in planes) <= 255:
        # 16-bit files holding 8-bit values: scaling by 65535 would make them near-black
        warnings.append(f"{image_id}: 16-bit PNG(s) holding only values 0..255; read as 8-bit")
        planes = [p.astype(np.uint8) for p in planes]
    elif len(depths) > 1:
        eight = [ch for ch, p in zip(CHANNELS, planes) if p.dtype == np.uint8]
        warnings.append(f"{image_id}: mixed 8/16-bit channels; converting {','.join(eight)} to 16 bits")
        planes = [p.astype(np.uint16) * np.uint16(257) if p.dtype == np.uint8 else p for p in planes]
    for w in warnings:
        logger.warning("%s", w)
    return np.stack(planes, axis=-1), warnings


def read_rgby(folder: str | os.PathLike, image_id: str, max_pixels: int | None = None) -> np.ndarray:
    """Read the four channel PNGs of one image into ``(H, W, 4)``, channel order R, G, B, Y.

    The result is uint8 when every channel is 8-bit, or when 16-bit channels hold only
    values 0..255 (read as the 8-bit image they are, with a warning), and uint16 otherwise
    (8-bit channels of a mixed image are scaled by 257 so that 255 -> 65535, with a
    warning). Raises :class:`ImageReadError` naming the file and the fault: an ID that is
    not a safe name (:func:`is_safe_id`), a channel over ``max_pixels`` (from its header),
    channels of different sizes (the first channel whose size differs from red's), and
    every fault of :func:`read_channel`.
    """
    return _read_rgby(folder, image_id, max_pixels)[0]


@dataclass
class LoadedImage:
    """One test image ready for the pipeline.

    ``image`` is the ``(size, size, 4)`` float32 image (:func:`resize_rgby`), or ``None``
    when loading failed; ``rgby`` is the raw ``(H, W, 4)`` uint8/uint16 image it was made
    from (models fed by another input pipeline start from it; ``None`` when loading failed);
    ``width``/``height`` are the original size (0 when unknown); ``error`` is ``None`` on
    success, else a one-line reason; ``warnings`` are what reading fixed on the way (one
    line each, naming the ID: 16-bit files holding 8-bit values, mixed depths).
    """

    id: str
    image: np.ndarray | None
    width: int
    height: int
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    rgby: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def load_image(
    folder: str | os.PathLike, image_id: str, size: int = 512, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> LoadedImage:
    """Read and resize one image; never raises (the reason goes to ``error``, logged).

    ``max_pixels`` caps each channel's declared size (:func:`read_channel`; ``None``: no cap).
    """
    try:
        rgby, warnings = _read_rgby(folder, image_id, max_pixels)
        height, width = rgby.shape[:2]
        image = resize_rgby(rgby, size)
    except Exception as e:  # noqa: BLE001 -- by contract: one bad image must not stop the run
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, ImageReadError):
            message = f"{image_id}: {type(e).__name__}: {message}"
        logger.warning("image %s not loaded: %s", image_id, message)
        return LoadedImage(id=image_id, image=None, width=0, height=0, error=message)
    return LoadedImage(id=image_id, image=image, width=int(width), height=int(height), warnings=warnings, rgby=rgby)
