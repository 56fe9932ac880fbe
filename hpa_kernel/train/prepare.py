"""Merge each image's four PNGs into an RGBY cache at ``size`` px, in parallel.

    python -m hpa_kernel.train.prepare --csv train.csv --src train/ [--src extra/ ...] \\
        --out cache/ [--size 512] [--workers 2] [--folds 4] [--max-pixels 50M]

Writes ``OUT/images/<ID>.npy`` (uint8 ``(size, size, 4)``, R G B Y) and
``OUT/index.csv`` (``ID,Label,path,width,height[,fold]``, ``path`` relative to ``OUT``,
``width/height`` the original size, 0 when unknown). An image is
looked up in each ``--src`` folder in turn; a row whose PNGs are missing or unreadable is
skipped with a warning and counted in the summary, and so is an ID that is not a safe
file name (:func:`hpa_kernel.formats.images.is_safe_id`: nothing is read or written for
it) and an image whose PNG header declares more than ``--max-pixels`` pixels per channel
(the cap ``submit`` applies; never decoded). Labels are checked before any image is read
(a class outside 0..18 or an empty label stops the run, naming the row and its CSV line);
so are duplicate IDs: with different labels they stop the run (naming the ID and its
lines), with the same label the first row is kept (a warning), so that one image never
lands in two folds. Cached files that already exist are kept unless ``--overwrite``.

Checked before any image is read (:class:`PrepareError`, one line, exit status 2): every
``--src`` is a folder and at least one CSV row has its PNGs there; ``OUT`` holds no cache of
another ``--size`` (recorded in ``OUT/cache.json``; ``--overwrite`` rebuilds); the
``iterative-stratification`` package is installed when folds are asked for.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from hpa_kernel.classes import parse_labels
from hpa_kernel.formats.images import DEFAULT_MAX_PIXELS, is_safe_id
from hpa_kernel.train.folds import FoldError, assign_folds, format_fold_table, label_matrix

__all__ = ["PrepareError", "PrepareSummary", "check_sources", "check_cache_size", "find_source", "cache_one",
           "prepare_cache", "read_label_csv", "main"]

logger = logging.getLogger(__name__)


class PrepareError(ValueError):
    """The inputs cannot give a cache (bad folder, cache of another size, missing package)."""


@dataclass
class PrepareSummary:
    """What :func:`prepare_cache` did."""

    index_path: Path
    written: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ID, reason)
    fold_table: str | None = None  # per-fold class counts, when folds were assigned

    @property
    def ok(self) -> int:
        return self.written + self.reused

    def __str__(self) -> str:
        return (
            f"{self.ok} image(s) cached ({self.written} written, {self.reused} reused), "
            f"{len(self.skipped)} skipped -> {self.index_path}"
        )


def find_source(image_id: str, sources: Sequence[Path]) -> Path | None:
    """The first folder holding ``<ID>_red.png`` (None if no folder has it)."""
    for src in sources:
        if (Path(src) / f"{image_id}_red.png").exists():
            return Path(src)
    return None


def check_sources(ids: Sequence[str], sources: Sequence[Path]) -> int:
    """Every source is a folder and at least one ID has ``<ID>_red.png`` in one of them.

    Returns how many IDs were found (each folder is listed once, no per-image stat).
    """
    if not sources:
        raise PrepareError("no --src folder given")
    names: set[str] = set()
    for src in sources:
        if not Path(src).is_dir():
            raise PrepareError(f"--src {src}: not a folder")
        names.update(n for n in os.listdir(src) if n.endswith("_red.png"))
    found = sum(f"{i}_red.png" in names for i in ids)
    if ids and found == 0:
        example = f"{ids[0]}_red.png"
        raise PrepareError(f"none of the {len(ids)} CSV rows has its PNGs in --src {', '.join(map(str, sources))} "
                           f"(looked for e.g. {example}): wrong folder?")
    return found


def check_cache_size(out: Path, size: int, overwrite: bool) -> None:
    """Refuse to add ``size`` px images to a cache of another size (unless ``overwrite``)."""
    marker = out / "cache.json"
    have = None
    if marker.is_file():
        try:
            have = int(json.loads(marker.read_text())["size"])
        except (ValueError, KeyError, TypeError):
            raise PrepareError(f"{marker}: unreadable cache record (delete it or use --overwrite)") from None
    elif (out / "images").is_dir():
        first = next((p for p in sorted((out / "images").glob("*.npy")) if not p.name.endswith(".tmp.npy")), None)
        if first is not None:
            have = int(np.load(first, mmap_mode="r").shape[0])
    if have is not None and have != size and not overwrite:
        raise PrepareError(f"{out} holds a {have} px cache; --size {size} needs another --out "
                           "(or --overwrite to rebuild it)")


def cache_one(
    image_id: str, sources: Sequence[Path], dest: Path, size: int, overwrite: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[str, str, tuple[int, int]]:
    """Read, resize and save one image. Returns ``(status, detail, (width, height))`` with
    status ``written``/``reused``/``skipped``; never raises for a bad image. An unsafe ID is
    skipped before any path is made of it; a channel over ``max_pixels`` is not decoded."""
    if not is_safe_id(image_id):
        return "skipped", f"ID {image_id!r} is not a safe file name", (0, 0)
    if dest.exists() and not overwrite:
        return "reused", "", (0, 0)
    src = find_source(image_id, sources)
    if src is None:
        return "skipped", f"no {image_id}_red.png in {', '.join(map(str, sources))}", (0, 0)
    from hpa_kernel.formats.images import read_rgby, resize_rgby

    try:
        rgby = read_rgby(src, image_id, max_pixels=max_pixels)
        small = resize_rgby(rgby, size)
    except Exception as e:  # ImageReadError, or a decoder failure
        return "skipped", f"{type(e).__name__}: {e}", (0, 0)
    arr = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    tmp = dest.with_name(dest.stem + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(dest)  # atomic: a killed run leaves no half-written cache file
    return "written", "", (int(rgby.shape[1]), int(rgby.shape[0]))


def _known_sizes(index_path: Path) -> dict[str, tuple[int, int]]:
    """Original sizes recorded by an earlier run (for images whose cache is reused)."""
    if not index_path.exists():
        return {}
    old = pd.read_csv(index_path)
    if not {"ID", "width", "height"} <= set(old.columns):
        return {}
    return {str(i): (int(w), int(h)) for i, w, h in zip(old["ID"], old["width"], old["height"])}


def read_label_csv(csv: str | Path) -> pd.DataFrame:
    """``ID,Label`` rows as text (an empty label stays empty, never NaN), checked: every
    label parses and is not empty, and an ID listed twice has one label (its first row is
    kept). Raises :class:`PrepareError` / :class:`FoldError` naming the row and CSV line."""
    df = pd.read_csv(csv, dtype={"ID": str, "Label": str}, keep_default_na=False)
    if not {"ID", "Label"} <= set(df.columns):
        raise PrepareError(f"{csv}: needs columns ID,Label (has {list(df.columns)})")
    empty = np.flatnonzero(df["Label"].str.strip() == "")
    if len(empty):
        i = int(empty[0])
        raise PrepareError(f"{csv}: row {i} (line {i + 2}, ID {df['ID'].iloc[i]!r}): empty Label "
                           f"({len(empty)} row(s); every image has a class, 18 = Negative)")
    label_matrix(df)
    dup = df["ID"].duplicated(keep=False)
    if dup.any():
        for image_id, rows in df[dup].groupby("ID", sort=False):
            labels = {"|".join(map(str, sorted(set(parse_labels(t))))) for t in rows["Label"]}
            if len(labels) > 1:
                lines = ", ".join(str(int(i) + 2) for i in rows.index)
                raise PrepareError(f"{csv}: ID {image_id!r} is listed with different labels "
                                   f"({', '.join(map(repr, rows['Label']))}, lines {lines}): fix the CSV")
        n = int(df["ID"].duplicated().sum())
        logger.warning("%s: %d duplicate row(s) of the same ID and label, first kept (e.g. %s)", csv, n,
                       df.loc[df["ID"].duplicated(), "ID"].iloc[0])
        df = df.drop_duplicates("ID").reset_index(drop=True)
    return df


def prepare_cache(
    csv: str | Path,
    sources: Sequence[str | Path],
    out: str | Path,
    size: int = 512,
    workers: int = 2,
    n_folds: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> PrepareSummary:
    """Build the cache and ``index.csv``; see the module docstring.

    With ``n_folds >= 2`` a ``fold`` column is added (multilabel-stratified) and the
    per-fold class table is logged.
    """
    df = read_label_csv(csv)  # fails before any work on a bad label or a conflicting duplicate, naming the row
    if n_folds and n_folds >= 2 and importlib.util.find_spec("iterstrat") is None:
        raise PrepareError("folds need the iterative-stratification package: pip install iterative-stratification "
                           "(or pip install -e \".[train]\"), or use --folds 0")
    out = Path(out)
    sources = [Path(s) for s in sources]
    ids = df["ID"].astype(str).tolist()
    found = check_sources(ids, sources)
    if found < len(ids):
        logger.warning("%d of %d CSV rows have no PNGs in the --src folders: they will be skipped",
                       len(ids) - found, len(ids))
    check_cache_size(out, size, overwrite)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps({"size": int(size), "dtype": "uint8", "channels": "RGBY"}))
    dests = [out / "images" / f"{i}.npy" if is_safe_id(i) else None for i in ids]  # no path from an unsafe ID
    jobs = (delayed(cache_one)(i, sources, d, size, overwrite, max_pixels) for i, d in zip(ids, dests))
    runner = Parallel(n_jobs=max(1, workers), return_as="generator")
    results = list(tqdm(runner(jobs), total=len(ids), desc="prepare", unit="img", disable=not progress))

    summary = PrepareSummary(index_path=out / "index.csv")
    known = _known_sizes(summary.index_path)
    keep, sizes = [], []
    for image_id, (status, detail, wh) in zip(ids, results):
        sizes.append(wh if status == "written" else known.get(image_id, (0, 0)))
        if status == "skipped":
            logger.warning("skipped %s: %s", image_id, detail)
            summary.skipped.append((image_id, detail))
            keep.append(False)
        else:
            summary.written += status == "written"
            summary.reused += status == "reused"
            keep.append(True)
    index = df.loc[keep, ["ID", "Label"]].reset_index(drop=True)
    index["path"] = [str(Path("images") / f"{i}.npy") for i in index["ID"].astype(str)]
    kept_sizes = [wh for wh, k in zip(sizes, keep) if k]
    index["width"] = [w for w, _ in kept_sizes]
    index["height"] = [h for _, h in kept_sizes]
    if n_folds and n_folds >= 2:
        index = assign_folds(index, n_folds=n_folds, seed=seed)
        summary.fold_table = format_fold_table(index)
    index.to_csv(summary.index_path, index=False)
    logger.info("%s", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    from hpa_kernel.run.options import parse_pixels

    ap = argparse.ArgumentParser(prog="python -m hpa_kernel.train.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path, help="CSV with ID,Label")
    ap.add_argument("--src", required=True, action="append", type=Path, help="folder of <ID>_<channel>.png (repeat)")
    ap.add_argument("--out", required=True, type=Path, help="cache folder")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--folds", type=int, default=4, help="folds to assign (0 = none)")
    ap.add_argument("--seed", type=int, default=0, help="fold seed")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--max-pixels", type=parse_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                    help="skip an image whose PNG header declares more than N pixels per channel, never decoding it "
                         f"(as submit's --max-pixels; default {DEFAULT_MAX_PIXELS}; 50M works too)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.csv.is_file():
        logger.error("--csv %s: file not found", args.csv)
        return 2
    try:
        summary = prepare_cache(
            args.csv, args.src, args.out, args.size, args.workers, args.folds, args.seed, args.overwrite,
            max_pixels=args.max_pixels,
        )
    except (PrepareError, FoldError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2
    if summary.fold_table:
        print(summary.fold_table)
    print(summary)
    if summary.skipped:
        print(f"skipped {len(summary.skipped)}: " + ", ".join(i for i, _ in summary.skipped[:20]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
