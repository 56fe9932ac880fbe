"""Several runs at once: one ``python -m hpa_kernel.submit --shard I/N`` process per device.

Kaggle's GPU accelerator is two T4s and one process drives one GPU, so by default
(``--parallel auto``) the images are split into one shard per usable GPU, each shard runs
in its own process on its own device, and the parts are joined into the one submission.
``--parallel N`` asks for N processes (on a CPU-only machine too: each then gets
``cpu_count // N`` threads).

A shard whose process dies is started again at once, on the device of a shard that has
not failed, resuming from its journal; rows still missing after that come from its
journal or are written empty with a warning, so every ID keeps its row. Stages are the
ones of :mod:`hpa_kernel.run.pipeline`; this module only launches, watches and joins.
Each shard's command line is ours through :func:`hpa_kernel.run.options.shard_argv`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from hpa_kernel.formats.atomic import open_regular, read_regular
from hpa_kernel.formats.images import TEST_DIR, fallback_size, read_test_set
from hpa_kernel.run.device import cuda_problem, resolve_device
from hpa_kernel.run.join import Part, join_shards
from hpa_kernel.run.journal import journal_path
from hpa_kernel.run.lock import OutputBusy, hold_output
from hpa_kernel.run.options import select_ids, shard_argv

logger = logging.getLogger(__name__)

__all__ = ["Shard", "ParallelResult", "plan_devices", "part_path", "run_shards", "join_parts", "run_parallel"]

#: rerun a failed shard only if at least this much of the time budget is left (seconds)
MIN_RERUN_SECONDS = 120.0


@dataclass
class Shard:
    """One process's share: every ``count``-th image from ``index``, on ``device``."""

    index: int
    count: int
    device: str
    out: Path
    ids: list[str]
    rc: int | None = None
    attempts: int = 0
    _journal_pos: int = field(default=0, repr=False)
    _journal_rows: int = field(default=0, repr=False)

    @property
    def journal(self) -> Path:
        return journal_path(self.out)

    @property
    def stdout(self) -> Path:
        return self.out.with_name(self.out.name + ".log")

    def rows_done(self) -> int:
        """Images finished so far: the journal's rows while running (read incrementally),
        all of them once the process ended well (the journal is then removed)."""
        if self.rc in (0, 1):
            return len(self.ids)
        try:
            with os.fdopen(open_regular(self.journal, os.O_RDONLY), "rb") as f:
                f.seek(self._journal_pos)
                chunk = f.read()
        except OSError:
            return self._journal_rows
        complete = chunk.rfind(b"\n") + 1  # count whole lines only
        self._journal_rows += chunk.count(b"\n", 0, complete)
        self._journal_pos += complete
        return max(0, self._journal_rows - 1)  # the first line is the header


@dataclass
class ParallelResult:
    """What the parallel run did, for the summary and the exit status."""

    shards: list[Shard]
    reruns: list[int] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)  # IDs written empty: no part had them
    wall_seconds: float = 0.0

    def format(self) -> str:
        devices = ", ".join(f"{s.index}/{s.count} on {s.device}: {len(s.ids)} images, exit {s.rc}" for s in self.shards)
        lines = [f"parallel: {len(self.shards)} processes ({devices}); wall time {self.wall_seconds:.1f} s"]
        if self.reruns:
            lines.append(f"  shard(s) {', '.join(map(str, self.reruns))} failed and were run again (resuming)")
        if self.filled:
            lines.append(f"  {len(self.filled)} row(s) written empty: their shard failed twice, e.g. {self.filled[:5]}")
        failed = [s.index for s in self.shards if s.rc not in (0, 1)]
        if failed:
            lines.append(f"  shard(s) {', '.join(map(str, failed))} failed twice: rows from their journals, the rest empty")
        return "\n".join(lines)


def usable_cuda_devices() -> list[str]:
    """Every CUDA device this torch can run on (see :func:`hpa_kernel.run.device.cuda_problem`)."""
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        problem = cuda_problem(f"cuda:{i}")
        if problem is None:
            found.append(f"cuda:{i}")
        else:
            logger.warning("not using cuda:%d: %s", i, problem)
    return found


def plan_devices(device: str, parallel: str | int, gpus: Callable[[], list[str]] = usable_cuda_devices) -> list[str]:
    """The device of each process, from ``--device`` and ``--parallel``.

    ``auto``: one process per usable GPU when ``device`` is ``auto`` or ``cuda`` and there
    are several, else one process on ``device``. ``N``: N processes: on the usable GPUs in
    turn (``device`` ``auto``/``cuda``), else all on ``device`` (``cpu`` when ``auto`` finds
    no GPU). A device named with an index (``cuda:1``) takes every process.
    """
    wants_gpu = device in ("auto", "cuda")
    if parallel == "auto":
        found = gpus() if wants_gpu else []
        return found if len(found) > 1 else [device]
    n = int(parallel)
    if n < 1:
        raise ValueError(f"--parallel {parallel}: need at least 1")
    found = gpus() if wants_gpu and n > 1 else []
    if found:
        return [found[i % len(found)] for i in range(n)]
    return ["cpu" if device == "auto" and n > 1 else device] * n


def part_path(out: Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` writes its part: next to ``out``."""
    return out.with_name(f"{out.stem}.part{index}of{count}{out.suffix or '.csv'}")


def launch_process(cmd: Sequence[str], env: dict[str, str], stdout: Path) -> subprocess.Popen:
    """Start one shard process; its stdout (the summary) goes to a file, stderr (the log)
    to ours."""
    with os.fdopen(open_regular(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
        return subprocess.Popen(list(cmd), env=env, stdout=f, stderr=None)


#: set in a shard process's environment: the parent's pid (see :func:`die_with_parent`)
PARENT_ENV = "HPA_KERNEL_PARENT_PID"


def _env(n_processes: int) -> dict[str, str]:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_processes))
    env[PARENT_ENV] = str(os.getpid())
    return env


def die_with_parent() -> bool:
    """In a shard process: end when the parallel parent dies (Linux ``PR_SET_PDEATHSIG``),
    so that a killed run leaves no shard writing its journal while a restart begins.
    Returns whether it could be arranged (not on other systems)."""
    import signal

    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    try:
        os.kill(int(parent), 0)  # the parent died before the call: go now
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, ValueError):
        pass
    return True


def run_shards(
    shards: list[Shard],
    command: Callable[[Shard, float | None], list[str]],
    time_budget: float | None = None,
    progress: bool = True,
    launch: Callable[[Sequence[str], dict[str, str], Path], subprocess.Popen] | None = None,
    poll_seconds: float = 1.0,
) -> ParallelResult:
    """Run every shard in its own process at once; a shard whose process fails is started
    again at once (resuming from its journal), on the device of a shard that has not
    failed, if at least :data:`MIN_RERUN_SECONDS` of the time budget are left.

    ``command(shard, seconds_left)`` gives a shard's command line; ``launch(cmd, env,
    stdout_path)`` starts it (default :func:`launch_process`). A shard succeeded when its
    process exited 0 or 1 (1: some images failed, the part is complete).
    """
    launch = launch or launch_process
    start = time.monotonic()
    result = ParallelResult(shards)
    total = sum(len(s.ids) for s in shards)
    bar = _progress(total, progress)

    def left() -> float | None:
        return None if time_budget is None else time_budget - (time.monotonic() - start)

    def start_shard(i: int) -> subprocess.Popen:
        s = shards[i]
        s.attempts += 1
        s.rc = None
        proc = launch(command(s, left()), _env(len(shards)), s.stdout)
        logger.info("shard %d/%d: %d images on %s (pid %s)", s.index, s.count, len(s.ids), s.device, proc.pid)
        return proc

    def healthy_device(i: int) -> str:
        """A device whose shard has not failed (the failed shard's own if none)."""
        for other in shards:
            if other is not shards[i] and other.rc in (None, 0, 1):
                return other.device
        return shards[i].device

    running = {i: start_shard(i) for i in range(len(shards))}
    while running:
        for i, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            s = shards[i]
            s.rc = rc
            del running[i]
            if rc in (0, 1) or s.attempts >= 2:
                continue
            remaining = left()
            if remaining is not None and remaining < MIN_RERUN_SECONDS:
                logger.error("shard %d/%d exited with %s; no time left to run it again", s.index, s.count, rc)
                continue
            s.device = healthy_device(i)
            logger.error("shard %d/%d exited with %s: running it again on %s, resuming", s.index, s.count, rc, s.device)
            result.reruns.append(s.index)
            running[i] = start_shard(i)
        if bar is not None:
            bar.update(sum(s.rows_done() for s in shards) - bar.n)
        if running:
            time.sleep(poll_seconds)
    if bar is not None:
        bar.update(sum(s.rows_done() for s in shards) - bar.n)
        bar.close()
    result.wall_seconds = time.monotonic() - start
    return result


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="images", file=sys.stderr, dynamic_ncols=True)


def join_parts(
    result: ParallelResult,
    ids: Sequence[str],
    out: Path,
    fallback_size: Callable[[str], tuple[int, int]],
) -> Path:
    """Write the one submission from the shards' parts, in ``ids`` order, with the lenient
    :func:`~hpa_kernel.run.join.join_shards` (a failed shard's journal rows, the rest empty;
    those IDs are listed in ``result.filled``). The parts of the shards that succeeded are
    removed afterwards (a failed shard's journal is kept)."""
    parts = [Part(s.out, set(s.ids), f"shard {s.index}/{s.count}") for s in result.shards]
    result.filled = join_shards(parts, ids, out, strict=False, fallback_size=fallback_size)
    for s in result.shards:
        if s.rc in (0, 1) and s.out.exists():
            s.out.unlink()
    return out


def run_parallel(args: argparse.Namespace, devices: list[str], data_dir: Path, out: Path, time_budget: float | None,
                 launch: Callable[[Sequence[str], dict[str, str], Path], subprocess.Popen] | None = None) -> int:
    """One shard process per device, then the parts joined into ``out``: every ID gets its
    row. Prints the shards' summaries and ours. Exit status 0 when every shard finished
    every image, 1 when something failed, 2 when nothing could run (another run holds
    ``out``'s lock: :func:`~hpa_kernel.run.lock.hold_output`, taken before anything).
    ``launch`` starts a shard's process (as in :func:`run_shards`)."""
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(hold_output(out))
    except (OutputBusy, OSError) as e:
        print(f"error: --out: {e}", file=sys.stderr)
        return 2
    with lock:
        return _run_parallel(args, devices, data_dir, out, time_budget, launch)


def _run_parallel(args: argparse.Namespace, devices: list[str], data_dir: Path, out: Path,
                  time_budget: float | None, launch=None) -> int:
    """:func:`run_parallel` once ``out`` is locked."""
    try:
        for d in sorted(set(devices) - {"cpu"}):
            resolve_device(d)  # a device no shard could use stops the run here, once
        ids, sample = read_test_set(data_dir)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(devices)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the output folder: {e}", file=sys.stderr)
        return 2
    shards = [Shard(i, n, d, part_path(out, i, n), select_ids(ids, (i, n), args.max_images)) for i, d in enumerate(devices)]
    logger.info("%d images in %d shard processes on %s", sum(len(s.ids) for s in shards), n, ", ".join(devices))

    def command(s: Shard, seconds_left: float | None) -> list[str]:
        argv = shard_argv(args, data_dir, (s.index, s.count), s.device, s.out, seconds_left, rerun=s.attempts > 1)
        return [sys.executable, "-m", "hpa_kernel.submit", *argv]

    result = run_shards(shards, command, time_budget, progress=not args.no_progress and not args.quiet, launch=launch)
    for s in shards:
        if os.path.lexists(s.stdout):
            try:
                text = read_regular(s.stdout).decode("utf-8", "replace").strip()
            except OSError as e:
                text = f"(its output {s.stdout} cannot be read: {e})"
            if text:
                print(f"== shard {s.index}/{s.count} ({s.device})\n{text}")
            s.stdout.unlink()
    if all(s.rc == 2 for s in shards):  # e.g. no usable classifier: an all-empty file would score zero
        print("error: every shard process stopped before any image (exit 2, reasons above): nothing was run",
              file=sys.stderr)
        return 2
    wanted = set().union(*(s.ids for s in shards))
    sizes = sample.sizes if sample else {}
    join_parts(result, [i for i in ids if i in wanted], out, lambda i: fallback_size(data_dir / TEST_DIR, i, sizes))
    print(result.format())
    print(f"wrote {out}")
    return 0 if all(s.rc == 0 for s in shards) and not result.filled else 1
