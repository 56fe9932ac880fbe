"""Weights integrity: record and verify the size and sha256 of every file a manifest names.

The manifest's ``files`` section maps a path (relative to the manifest's folder, or
absolute for files outside it, e.g. ``/kaggle/input/...``) to ``{"size", "sha256"}``::

    "files": {"demo/model.pt": {"size": 123, "sha256": "ab12..."}}

:func:`verify_files` runs at start-up of the pipeline. For every file the configuration
will load (the segmentation weights when ``method`` is ``hpa``, every classifier path):

- a missing file is always an error;
- a recorded size that differs is always an error (cheap: one ``stat``);
- a recorded sha256 that differs is an error unless ``check_hash=False``.

A named file without an entry is accepted with a warning (hand-written manifests), as
is an entry for a file the configuration does not use (it is not checked).

Rewrite a manifest's ``files`` section for every file it names::

    python -m hpa_kernel.integrity --manifest weights/manifest.json --update

and check one (exit status 1 on a mismatch, the file named)::

    python -m hpa_kernel.integrity --manifest weights/manifest.json [--no-hash]

Files named by absolute paths that exist only on Kaggle (``/kaggle/input/...``, with
``--allow-outside-paths``) are recorded from local copies of the same name::

    python -m hpa_kernel.integrity --manifest weights/manifest.json --update \
        --allow-outside-paths --local-copies ~/hpa-seg-weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpa_kernel.config import ConfigError, KernelConfig, load_config, write_manifest

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20  # 1 MiB


class IntegrityError(ConfigError):
    """A weights file is missing or differs from what the manifest recorded.

    A kind of :class:`~hpa_kernel.config.ConfigError`, so code that reports bad
    configurations reports this too. ``path`` is the offending file, ``reason`` the fault.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"weights file {self.path}: {reason}")


def file_digest(path: str | Path, chunk_size: int = CHUNK_SIZE) -> str:
    """The hex sha256 of a file, read in chunks (memory stays flat for large weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _manifest_root(manifest_path: str | Path) -> Path:
    p = Path(manifest_path)
    if p.is_dir():
        return p.resolve()
    return p.resolve().parent


def _file_key(root: Path, path: Path) -> str:
    """The ``files`` key of ``path``: relative (posix) inside ``root``, else absolute."""
    full = path if path.is_absolute() else (root / path)
    full = Path(os.path.abspath(full))
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return full.as_posix()


def _is_inside(root: Path, path: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(root)
        return True
    except ValueError:
        return False


def _key_path(root: Path, key: str) -> Path:
    """The file a ``files`` key stands for (inverse of :func:`_file_key`)."""
    p = Path(key)
    return p if p.is_absolute() else Path(os.path.abspath(root / p))


def _local_copy(full: Path, local_copies: Sequence[str | Path], shared_name: bool) -> Path:
    """The local copy of ``full``: the first folder of ``local_copies`` holding the longest
    tail of its path (``DIR/<run>/fold1/.../model_best.pt`` for a mirrored tree, else
    ``DIR/<name>``); ``full`` itself when none does. A name several files share (the team's
    ``model_best.pt`` folds) must match on more than its name: one copy for all would be
    recorded silently."""
    parts = full.parts[1:]  # without the root
    for folder in local_copies:
        for k in range(len(parts), 0, -1):
            candidate = Path(folder).joinpath(*parts[-k:])
            if candidate.is_file():
                if k == 1 and shared_name:
                    raise IntegrityError(
                        full, f"several named files are called {full.name}: mirror their folders under "
                              f"{folder} (e.g. {Path(folder).joinpath(*parts[-min(len(parts), 5):])})"
                    )
                logger.info("%s is not here: recording its local copy %s", full, candidate)
                return candidate
    return full


def record_files(
    manifest_path: str | Path,
    paths: Iterable[str | Path],
    local_copies: Sequence[str | Path] = (),
) -> dict[str, dict[str, Any]]:
    """``{key: {"size", "sha256"}}`` for ``paths``, keyed relative to the manifest's folder.

    Relative ``paths`` are taken relative to the manifest's folder; a path outside that
    folder is keyed by its absolute path. A file outside the folder that does not exist
    here (e.g. ``/kaggle/input/<dataset>/x.pth`` on a workstation) is read from the first
    of ``local_copies`` (folders) holding a copy, found by the longest tail of its path
    (a mirrored tree, else the same name; a name several files share must match on more),
    and recorded under its own (Kaggle) path. Raises :class:`IntegrityError` for a file
    found nowhere.
    """
    root = _manifest_root(manifest_path)
    entries: dict[str, dict[str, Any]] = {}
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    for p in paths:
        key = _file_key(root, p)
        full = _key_path(root, key)
        source = full
        if not full.is_file() and not _is_inside(root, full):
            source = _local_copy(full, local_copies, shared_name=names.count(full.name) > 1)
        if not source.is_file():
            hint = "" if _is_inside(root, full) else " (pass --local-copies DIR holding a copy of it)"
            raise IntegrityError(full, f"missing (cannot record its size and sha256){hint}")
        entries[key] = {"size": source.stat().st_size, "sha256": file_digest(source)}
        logger.info("recorded %s: %d bytes, sha256 %s", key, entries[key]["size"], entries[key]["sha256"])
    return dict(sorted(entries.items()))


def named_files(config: KernelConfig) -> list[Path]:
    """Every file the configuration will load, in load order, without duplicates."""
    out: list[Path] = []
    seg = config.segmentation
    if seg.method == "hpa":
        out += [p for p in (seg.nuclei, seg.cell) if p is not None]
    out += [p for c in config.classifiers for p in c.paths]
    seen: set[Path] = set()
    unique = []
    for p in out:
        full = Path(os.path.abspath(p))
        if full not in seen:
            seen.add(full)
            unique.append(full)
    return unique


def verify_files(config: KernelConfig, check_hash: bool = True, inside_only: bool = False) -> None:
    """Check every file the configuration names against the manifest's ``files`` section.

    Raises :class:`IntegrityError` naming the first file that is missing, has another
    size than recorded, or (with ``check_hash``) another sha256. Sizes are always checked.
    ``inside_only`` checks only the files inside the manifest's folder (what a dataset
    build ships; files under ``/kaggle/input/...`` are checked on Kaggle).
    """
    root = Path(os.path.abspath(config.root))
    recorded: dict[Path, dict[str, Any]] = {}  # keyed by the resolved path (symlinks followed)
    for key, entry in (config.files or {}).items():
        if not isinstance(entry, dict):
            raise IntegrityError(_key_path(root, key), f"manifest entry must be an object, not {entry!r}")
        recorded[_key_path(root, key).resolve()] = entry
    names = named_files(config)
    if inside_only:
        skipped = [p for p in names if not _is_inside(root, p) and not _is_inside(root.resolve(), p)]
        for p in skipped:
            logger.info("%s is outside %s: not checked here", p, root)
        names = [p for p in names if p not in skipped]
    checked = 0
    for path in names:
        if not path.is_file():
            raise IntegrityError(path, "missing" if not path.exists() else "not a regular file")
        entry = recorded.get(path.resolve())
        if entry is None:
            logger.warning(
                "no size/sha256 recorded for %s; not verified (record it with "
                "`python -m hpa_kernel.integrity --manifest %s --update`)",
                path,
                config.source or "MANIFEST",
            )
            continue
        size = path.stat().st_size
        if "size" in entry and int(entry["size"]) != size:
            raise IntegrityError(path, f"size mismatch: {size} bytes, manifest says {int(entry['size'])}")
        if check_hash and "sha256" in entry:
            digest = file_digest(path)
            if digest.lower() != str(entry["sha256"]).lower():
                raise IntegrityError(path, f"sha256 mismatch: {digest}, manifest says {entry['sha256']}")
        checked += 1
        logger.debug("verified %s (%s)", path, "size + sha256" if check_hash else "size")
    unused = set(recorded) - {p.resolve() for p in names}
    for path in sorted(unused):
        logger.info("manifest records %s but the configuration does not use it; not checked", path)
    logger.info(
        "weights integrity: %d of %d file(s) checked (%s)%s", checked, len(names),
        "size + sha256" if check_hash else "size only",
        f"; {len(names) - checked} not recorded, not verified" if checked < len(names) else "",
    )


def update_manifest(
    manifest_path: str | Path,
    allow_outside: bool = False,
    local_copies: Sequence[str | Path] = (),
) -> dict[str, dict[str, Any]]:
    """Rewrite the manifest's ``files`` section for every file it names (atomically).

    Other keys keep their values and order; stale entries are dropped. Returns the section.
    ``local_copies``: see :func:`record_files`.
    """
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.json"
    config = load_config(manifest_path, allow_outside=allow_outside)
    files = record_files(manifest_path, named_files(config), local_copies=local_copies)
    raw = json.loads(manifest_path.read_text())
    raw["files"] = files
    write_manifest(manifest_path, raw)
    logger.info("wrote %d file entr%s to %s", len(files), "y" if len(files) == 1 else "ies", manifest_path)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check (default) or ``--update`` a manifest's ``files`` section."""
    ap = argparse.ArgumentParser(
        prog="python -m hpa_kernel.integrity",
        description="Record (--update) or verify the size and sha256 of every weights file a manifest names.",
    )
    ap.add_argument("--manifest", required=True, type=Path, help="weights manifest (JSON) or its folder")
    ap.add_argument("--update", action="store_true", help="rewrite the manifest's 'files' section")
    ap.add_argument("--no-hash", action="store_true", help="when checking, compare sizes only")
    ap.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="accept absolute paths / paths outside the manifest folder (e.g. /kaggle/input/...)",
    )
    ap.add_argument(
        "--local-copies",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="with --update: folder holding copies of files named by absolute paths that do not exist here",
    )
    ap.add_argument(
        "--inside-only",
        action="store_true",
        help="when checking, skip files outside the manifest folder (they are checked where they live)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.update:
            files = update_manifest(
                args.manifest, allow_outside=args.allow_outside_paths, local_copies=args.local_copies
            )
            for key, entry in files.items():
                print(f"{entry['sha256']}  {entry['size']:>12}  {key}")
        else:
            config = load_config(args.manifest, allow_outside=args.allow_outside_paths)
            verify_files(config, check_hash=not args.no_hash, inside_only=args.inside_only)
            scope = " (files outside its folder not checked)" if args.inside_only else ""
            print(f"OK: {len(named_files(config))} file(s) named by {config.source}{scope}")
    except ConfigError as e:  # IntegrityError included
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
