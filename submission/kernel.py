"""HPA single-cell classification: the offline Kaggle kernel for ``hpa_kernel``.

On Kaggle (GPU on, internet off) this script

1. finds our dataset (``/kaggle/input/hpa-kernel``, or any attached folder holding an
   ``hpa_kernel-*.whl``);
2. installs the wheel offline::

       pip install --no-index --find-links <dataset>/wheelhouse --find-links <dataset> hpa_kernel==<version>

   (dependencies come from the Kaggle image, missing ones from the wheelhouse), then
   reinstalls exactly the dataset's wheel (``--no-deps --force-reinstall``);
3. runs ``python -m hpa_kernel.submit --weights <dataset>/weights/manifest.json``, which
   on Kaggle reads the competition folder and writes ``/kaggle/working/submission.csv``.

Elsewhere, every path comes from arguments or environment variables::

    HPA_DATASET_DIR=dist/kaggle_dataset HPA_DATA_DIR=/data/hpa HPA_OUT=/tmp/submission.csv \\
        python submission/kernel.py

    python submission/kernel.py --dataset-dir dist/kaggle_dataset --data-dir /data/hpa \\
        --out /tmp/submission.csv -- --max-images 5

Environment: ``HPA_DATASET_DIR``, ``HPA_DATA_DIR``, ``HPA_OUT``, ``HPA_WEIGHTS`` (manifest;
default ``<dataset>/weights/manifest.json``), ``HPA_SUBMIT_ARGS`` (extra arguments for
``hpa_kernel.submit``, shell-quoted). Only the standard library is used here: nothing of
``hpa_kernel`` can be imported before it is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("kernel")

COMPETITION = "hpa-single-cell-image-classification"
DATASET_SLUG = "hpa-kernel"
KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")

# Extra arguments for `python -m hpa_kernel.submit` (edit here on Kaggle, where a script
# kernel gets no command line), e.g. ["--time-budget", "8.5h"] or ["--no-verify"].
SUBMIT_ARGS: list[str] = []

# After the install every requirement of the installed hpa_kernel (its metadata, i.e. setup.py's
# install_requires) must import, also when pip could not resolve them by name (e.g. opencv
# installed as opencv-python instead of -headless). The module of a distribution is its name
# with '_' for '-', except for these:
IMPORT_NAMES = {"opencv-python-headless": "cv2", "scikit-image": "skimage", "pycocotools": "pycocotools.mask"}

WHEEL_RE = re.compile(r"^hpa_kernel-(?P<version>[^-]+)-py3-none-any\.whl$")


class KernelError(RuntimeError):
    """The kernel cannot go on; the message says why and what to do."""


def _version_key(version: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


def find_wheel(dataset_dir: Path) -> tuple[Path, str]:
    """The newest ``hpa_kernel-<version>-py3-none-any.whl`` directly in ``dataset_dir``."""
    found = []
    for p in dataset_dir.glob("hpa_kernel-*.whl"):
        m = WHEEL_RE.match(p.name)
        if m:
            found.append((_version_key(m["version"]), m["version"], p))
    if not found:
        raise KernelError(f"no hpa_kernel-*-py3-none-any.whl in {dataset_dir} (build it with build_wheel.sh)")
    found.sort()
    if len(found) > 1:
        logger.warning("several wheels in %s; using the newest, %s", dataset_dir, found[-1][2].name)
    return found[-1][2], found[-1][1]


def find_dataset_dir(explicit: str | Path | None, kaggle_input: Path = KAGGLE_INPUT) -> Path:
    """Our dataset folder: the explicit one, else ``<input>/hpa-kernel``, else a search.

    The search looks up to four levels under ``kaggle_input`` (not into the competition's
    data) for a folder holding an ``hpa_kernel-*-py3-none-any.whl`` (Kaggle mounts a
    dataset under its slug, which users may change).
    """
    if explicit:
        d = Path(explicit).expanduser()
        if not d.is_dir():
            raise KernelError(f"dataset folder {d} does not exist")
        return d
    default = kaggle_input / DATASET_SLUG
    if default.is_dir() and any(default.glob("hpa_kernel-*.whl")):
        return default
    level = [kaggle_input] if kaggle_input.is_dir() else []
    for _depth in range(4):  # breadth first, shallowest match wins
        hits = sorted(d for d in level if any(WHEEL_RE.match(p.name) for p in d.glob("hpa_kernel-*.whl")))
        if hits:
            if len(hits) > 1:
                logger.warning("hpa_kernel wheels in several folders %s; using %s", [str(h) for h in hits], hits[0])
            return hits[0]
        nxt = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    nxt += [Path(e.path) for e in it if e.is_dir() and e.name != COMPETITION]
            except OSError:
                continue
        level = sorted(nxt)
    raise KernelError(
        f"hpa_kernel dataset not found: attach it (it holds hpa_kernel-*.whl) or set HPA_DATASET_DIR;"
        f" looked in {default} and under {kaggle_input}"
    )


def manifest_needs_outside_paths(manifest: Path, kaggle_input: Path = KAGGLE_INPUT) -> bool:
    """True when the manifest names files by absolute paths under ``kaggle_input``.

    Such a manifest (segmentation weights from another attached dataset) needs
    ``--allow-outside-paths``; the kernel passes it for read-only Kaggle input only.
    """
    try:
        raw = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False  # submit reports the problem with the manifest itself
    if not isinstance(raw, dict):
        return False
    paths: list[str] = []
    seg = raw.get("segmentation")
    if isinstance(seg, dict):
        paths += [str(seg[k]) for k in ("nuclei", "cell") if seg.get(k)]
    for c in raw.get("classifiers", []) or []:
        if isinstance(c, dict):
            folds = c.get("paths") if isinstance(c.get("paths"), list) else []
            paths += [str(p) for p in [c.get("path", ""), *folds]]
        else:
            paths.append(str(c))
    absolute = [p for p in paths if p and Path(p).is_absolute()]
    root = str(kaggle_input).rstrip("/") + "/"
    return bool(absolute) and all(p.startswith(root) for p in absolute)


def _pip(python: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    cmd = [python, "-m", "pip", "install", "--no-index", *args]
    logger.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def runtime_modules(requires: Sequence[str]) -> list[str]:
    """The modules to import for ``Requires-Dist`` lines (those of extras left out)."""
    lines = [r for r in requires if "extra" not in r.partition(";")[2]]
    names = [re.sub(r"[-_.]+", "-", re.split(r"[^A-Za-z0-9._-]", r.strip(), maxsplit=1)[0]).lower() for r in lines]
    return [IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names]


def _requires(python: str) -> list[str]:
    """Requires-Dist of the hpa_kernel installed for ``python``."""
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('hpa_kernel') or []))"
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([python, "-c", code], cwd=tmp, stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else []


def _missing_modules(python: str, modules: Sequence[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        print(m, type(e).__name__, e)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:  # not the cwd: no local folder shadows a module
        r = subprocess.run([python, "-c", code, *modules], cwd=tmp, stdout=subprocess.PIPE, text=True)
    return [line for line in r.stdout.splitlines() if line.strip()]


def install(dataset_dir: Path, python: str = sys.executable) -> str:
    """Install the dataset's wheel offline; returns the installed version."""
    wheel, version = find_wheel(dataset_dir)
    wheelhouse = dataset_dir / "wheelhouse"
    links = ["--find-links", str(dataset_dir)]
    if wheelhouse.is_dir():
        links = ["--find-links", str(wheelhouse), *links]
    else:
        logger.warning("%s has no wheelhouse/: dependencies must all come from this image", dataset_dir)
    r = _pip(python, [*links, f"hpa_kernel=={version}"])
    if r.returncode != 0:
        # Usually a dependency known here under another distribution name (opencv-python
        # vs opencv-python-headless): install the wheel alone and check the imports.
        logger.warning("pip could not resolve the dependencies:\n%s", r.stdout[-3000:])
        carried = wheelhouse / "requirements.txt"
        if carried.is_file():  # what build_wheel.sh carried for the missing ones (timm, ...)
            r1 = _pip(python, [*links, "-r", str(carried)])
            if r1.returncode != 0:
                logger.warning("installing %s failed too:\n%s", carried, r1.stdout[-3000:])
        logger.warning("installing the wheel without dependencies and checking the imports instead")
    else:
        logger.info("dependencies satisfied")
    r2 = _pip(python, ["--no-deps", "--force-reinstall", str(wheel)])
    if r2.returncode != 0:
        raise KernelError(f"installing {wheel.name} failed:\n{r2.stdout[-3000:]}")
    missing = _missing_modules(python, ["hpa_kernel", *runtime_modules(_requires(python))])
    if missing:
        raise KernelError(
            "modules hpa_kernel needs cannot be imported:\n  "
            + "\n  ".join(missing)
            + "\nadd their wheels to the dataset: bash build_wheel.sh --deps \"timm pycocotools <package>\""
        )
    with tempfile.TemporaryDirectory() as tmp:
        where = subprocess.run(
            [python, "-c", "import hpa_kernel; print(hpa_kernel.__version__); print(hpa_kernel.__file__)"],
            cwd=tmp,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        ).stdout.split("\n")
    if where[0] != version:
        raise KernelError(f"hpa_kernel {where[0]} is imported from {where[1]}, not the dataset's {version}")
    logger.info("hpa_kernel %s installed at %s", version, where[1])
    return version


def submit_command(
    python: str,
    manifest: Path,
    data_dir: str | None,
    out: str | None,
    extra: Sequence[str],
    kaggle_input: Path = KAGGLE_INPUT,
) -> list[str]:
    """The ``python -m hpa_kernel.submit`` command line."""
    cmd = [python, "-m", "hpa_kernel.submit", "--weights", str(manifest)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if out:
        cmd += ["--out", str(out)]
    extra = list(extra)
    if "--allow-outside-paths" not in extra and manifest_needs_outside_paths(manifest, kaggle_input):
        logger.info("the manifest names files under %s: passing --allow-outside-paths", kaggle_input)
        extra.append("--allow-outside-paths")
    return cmd + extra


def exit_status(submit_rc: int, out: Path | None, started: float | None = None) -> int:
    """The kernel's exit status: submit's 1 (file complete; some images, a classifier or the
    segmentation weights failed) is success.

    Python also exits with 1 on an uncaught exception, so 1 counts as success only when
    the submission file exists and was written after ``started`` (a time.time() value).
    """
    if submit_rc == 1 and out is not None and out.exists():
        if started is None or out.stat().st_mtime >= started - 1.0:
            logger.warning("some images failed (listed above); the submission is complete")
            return 0
        logger.error("%s is older than this run: not written by it", out)
    return submit_rc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Install hpa_kernel offline and write submission.csv.")
    ap.add_argument("--dataset-dir", default=os.environ.get("HPA_DATASET_DIR"), help="folder with the wheel")
    ap.add_argument("--data-dir", default=os.environ.get("HPA_DATA_DIR"), help="Kaggle-layout data folder")
    ap.add_argument("--out", default=os.environ.get("HPA_OUT"), help="submission CSV to write")
    ap.add_argument("--weights", default=os.environ.get("HPA_WEIGHTS"), help="weights manifest")
    ap.add_argument("--skip-install", action="store_true", help="use the hpa_kernel already installed")
    ap.add_argument("submit_args", nargs="*", help="after --: extra arguments for hpa_kernel.submit")
    if argv is None:
        # In a notebook cell sys.argv holds the kernel's own arguments: ignore them.
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernel: %(message)s", datefmt="%H:%M:%S", force=True)
    args = parse_args(argv)
    python = sys.executable
    logger.info("python %s (%s)", sys.version.split()[0], python)
    try:
        dataset_dir = find_dataset_dir(args.dataset_dir)
        logger.info("dataset: %s", dataset_dir)
        if not args.skip_install:
            install(dataset_dir, python)
        manifest = Path(args.weights) if args.weights else dataset_dir / "weights" / "manifest.json"
        if not manifest.exists():
            raise KernelError(f"weights manifest {manifest} not found (set HPA_WEIGHTS or --weights)")
    except KernelError as e:
        logger.error("%s", e)
        return 2
    extra = [*SUBMIT_ARGS, *shlex.split(os.environ.get("HPA_SUBMIT_ARGS", "")), *args.submit_args]
    cmd = submit_command(python, manifest, args.data_dir, args.out, extra)
    logger.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
    started = time.time()
    rc = subprocess.call(cmd)
    out = Path(args.out) if args.out else (KAGGLE_WORKING / "submission.csv" if KAGGLE_WORKING.is_dir() else None)
    status = exit_status(rc, out, started)
    logger.info("hpa_kernel.submit exited with %d; kernel exit status %d", rc, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
