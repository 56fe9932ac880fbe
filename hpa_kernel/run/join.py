"""The one join of shard parts into a submission, :func:`join_shards`: strict for
``python -m hpa_kernel.submit merge``, lenient (journals, empty rows) for ``--parallel``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Sequence

from hpa_kernel.formats.submission import Row, read_submission, write_submission
from hpa_kernel.run.journal import journal_path, read_journal

__all__ = ["Part", "join_shards"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One shard's CSV; ``ids``: the IDs it answers for (``None``: whatever it holds)."""

    path: Path
    ids: Collection[str] | None = None
    name: str = ""  # how the log names it (default: the path)


def _lenient_rows(part: Part) -> dict[str, Row]:
    """A part's rows, or its journal's when the part is missing or unreadable (logged)."""
    name, rows = part.name or str(part.path), {}
    try:
        rows = read_submission(part.path) if part.path.exists() else {}
    except (OSError, ValueError) as e:
        logger.error("%s: %s", name, e)
    journal = journal_path(part.path)
    if not rows and journal.exists():  # the shard died: keep the images it finished
        try:
            rows = {i: r[:3] for i, r in read_journal(journal).items()}
            logger.warning("%s: %d finished row(s) taken from its journal", name, len(rows))
        except (OSError, ValueError, KeyError) as e:
            logger.error("%s: journal unreadable: %s", name, e)
    return rows


def join_shards(
    parts: Sequence[Part | str | os.PathLike],
    ids: Sequence[str],
    out: str | os.PathLike,
    strict: bool = True,
    fallback_size: Callable[[str], tuple[int, int]] | None = None,
) -> list[str]:
    """Write ``out`` (atomically, in ``ids`` order) from the parts; return the IDs written empty.

    Every ID in exactly one part (``ValueError`` naming a repeated one; a missing one too when
    ``strict``). Lenient: a part that cannot be read gives its journal's rows, and an ID no
    part has is written empty at ``fallback_size(ID)``. Rows outside ``Part.ids`` are ignored.
    """
    parts = [p if isinstance(p, Part) else Part(Path(p)) for p in parts]
    rows: dict[str, Row] = {}
    seen_in: dict[str, Path] = {}
    for part in parts:
        got = read_submission(part.path) if strict else _lenient_rows(part)
        for image_id, row in got.items():
            if part.ids is not None and image_id not in part.ids:
                continue
            if image_id in rows:
                raise ValueError(f"{part.path}: ID {image_id} is also in {seen_in[image_id]}")
            rows[image_id], seen_in[image_id] = tuple(row), part.path
    missing = [i for i in ids if i not in rows]
    if missing and (strict or fallback_size is None):
        raise ValueError(f"{len(missing)} ID(s) in no part, e.g. {missing[:5]}")
    if missing:
        logger.error("%d row(s) written empty: their shard failed", len(missing))
    write_submission(rows, list(ids), out, fallback={i: fallback_size(i) for i in missing} if missing else None)
    return missing
