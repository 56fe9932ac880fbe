#!/usr/bin/env bash
# Build everything the offline Kaggle kernel needs:
#
#   OUT/hpa_kernel-<version>-py3-none-any.whl   the package (no weights inside)
#   OUT/wheelhouse/                             runtime wheels a Kaggle GPU image may lack: the
#                                               dependency closure of --deps and of hpa_kernel's
#                                               own requirements, minus KAGGLE_PROVIDED (below)
#   OUT/kaggle_dataset/                         wheel + wheelhouse/ + weights/ + dataset-metadata.json,
#                                               ready for `kaggle datasets create -p OUT/kaggle_dataset --dir-mode zip`
#   OUT/kaggle_kernel/                          submission/kernel.py + kernel-metadata.json naming that dataset,
#                                               ready for `kaggle kernels push -p OUT/kaggle_kernel`
#
# Idempotent: everything is built in a staging folder and swapped in at the end; stale
# wheels and folders of earlier runs are removed. The wheel is reproducible
# (SOURCE_DATE_EPOCH = time of the last commit unless set).
#
# Usage: bash build_wheel.sh [--python 3.10[,3.11]] [--platform manylinux_2_28_x86_64] [--out dist]
#                            [--deps "timm pycocotools"] [--no-wheelhouse]
#                            [--weights weights] [--dataset-id USERNAME/hpa-kernel]
#                            [--title TITLE] [--license other] [--kernel-id USER/hpa-kernel-submit]
#                            [--extra-dataset OWNER/SLUG] [--no-weights-check]
#                            [--print-kaggle-provided]
# Environment: PYTHON (the interpreter that builds; default python3).
set -euo pipefail

# What the Kaggle GPU image brings (with everything these need). The wheelhouse never
# carries them, nor walks into their dependencies; everything else hpa_kernel, timm and
# pycocotools need (pyyaml, safetensors, huggingface_hub and its dependencies, ...) is
# carried. The one place this list lives (README "Run on Kaggle" points here;
# `--print-kaggle-provided` prints it for tests and scripts).
KAGGLE_PROVIDED=(torch torchvision torchaudio numpy pandas scipy scikit-image
                 opencv-python opencv-python-headless opencv-contrib-python joblib tqdm pillow)

PROG="build_wheel.sh"
die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    cat <<'EOF'
Usage: bash build_wheel.sh [options]

Builds the hpa_kernel wheel, a wheelhouse of runtime dependencies and the Kaggle
dataset folder (wheel + wheelhouse + weights + dataset-metadata.json).

Options:
  --out DIR            output folder (default: <repo>/dist)
  --python X.Y[,X.Z]   Python version(s) of the Kaggle image, for the wheelhouse
                       (default 3.10,3.11,3.12: compiled wheels exist once per version)
  --platform TAG       newest platform tag the Kaggle image runs (default manylinux_2_28_x86_64:
                       wheels for glibc 2.28 and older; manylinux2014_x86_64 = glibc 2.17)
  --deps "A B==1.0"    wheelhouse requirements, space or comma separated, replacing the default
                       list (timm pycocotools, pinned to the versions installed here when they
                       are). The wheelhouse holds their dependency closure and that of
                       hpa_kernel's requirements, without the packages the Kaggle image
                       brings (--print-kaggle-provided); torch/torchvision/torchaudio are
                       refused: Kaggle brings its own CUDA build
  --no-wheelhouse      do not download anything (offline / CI): the wheelhouse stays empty
  --offline            same as --no-wheelhouse
  --weights DIR        weights folder copied into the dataset (default: <repo>/weights);
                       must hold manifest.json
  --no-weights-check   do not check the copied weights against the manifest's sizes/sha256
                       nor test-load its classifiers with the kernel's loader (which needs
                       torch and timm in the building Python)
  --dataset-id ID      Kaggle dataset id OWNER/SLUG (default USERNAME/hpa-kernel)
  --title TITLE        dataset title, 6-50 characters (default "hpa-kernel wheel and weights")
  --license NAME       dataset license name (default "other")
  --kernel-id ID       Kaggle kernel id OWNER/SLUG (default <dataset owner>/hpa-kernel-submit)
  --extra-dataset ID   another dataset the kernel attaches (repeatable), e.g. the one holding
                       the HPA segmentation weights
  --print-kaggle-provided  print the packages taken from the Kaggle image, one a line, and exit
  -h, --help           this help

The wheel is built with the building interpreter's setuptools (no download) when it can
make wheels (setuptools >= 70.1, or the `wheel` package installed); otherwise pip builds
it in an isolated environment with setuptools and wheel from the index, and with
--no-wheelhouse/--offline the script stops and says what to install.

Environment: PYTHON = interpreter used to build (default python3). SOURCE_DATE_EPOCH
(default: time of the last git commit) fixes the timestamps inside the wheel.
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
PY_VERSIONS="3.10,3.11,3.12"
PLATFORM="manylinux_2_28_x86_64"
OUT="$REPO/dist"
DEPS=""
DEPS_SET=0
WHEELHOUSE=1
WEIGHTS="$REPO/weights"
WEIGHTS_CHECK=1
DATASET_ID="USERNAME/hpa-kernel"
TITLE="hpa-kernel wheel and weights"
LICENSE="other"
KERNEL_ID=""
EXTRA_SOURCES=()
DEFAULT_DEPS=(timm pycocotools)
FORBIDDEN_DEPS=(torch torchvision torchaudio)

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    arg="$1"
    if [[ "$arg" == --*=* ]]; then  # --opt=value
        set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
        arg="$1"
    fi
    case "$arg" in
        --python) need_value "$@"; PY_VERSIONS="$2"; shift 2 ;;
        --platform) need_value "$@"; PLATFORM="$2"; shift 2 ;;
        --out) need_value "$@"; OUT="$2"; shift 2 ;;
        --deps) [[ $# -ge 2 ]] || die "--deps needs a value"; DEPS="$2"; DEPS_SET=1; shift 2 ;;
        --no-wheelhouse|--offline) WHEELHOUSE=0; shift ;;
        --weights) need_value "$@"; WEIGHTS="$2"; shift 2 ;;
        --no-weights-check) WEIGHTS_CHECK=0; shift ;;
        --dataset-id) need_value "$@"; DATASET_ID="$2"; shift 2 ;;
        --title) need_value "$@"; TITLE="$2"; shift 2 ;;
        --license) need_value "$@"; LICENSE="$2"; shift 2 ;;
        --kernel-id) need_value "$@"; KERNEL_ID="$2"; shift 2 ;;
        --extra-dataset) need_value "$@"; EXTRA_SOURCES+=("$2"); shift 2 ;;
        --print-kaggle-provided) printf '%s\n' "${KAGGLE_PROVIDED[@]}"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$arg' (see --help)" ;;
    esac
done

# ---------------------------------------------------------------- checks
[[ "$PY_VERSIONS" =~ ^3\.[0-9]+(,3\.[0-9]+)*$ ]] || die "--python wants X.Y or a list X.Y,X.Z (e.g. 3.10,3.11), not '$PY_VERSIONS'"
IFS=, read -r -a PY_LIST <<< "$PY_VERSIONS"
[[ "$DATASET_ID" =~ ^[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]{1,48}[a-z0-9]$ ]] \
    || die "--dataset-id wants OWNER/slug (slug: 3-50 lowercase letters, digits, '-'), not '$DATASET_ID'"
OWNER="${DATASET_ID%%/*}"
[[ -n "$KERNEL_ID" ]] || KERNEL_ID="$OWNER/hpa-kernel-submit"
[[ "$KERNEL_ID" =~ ^[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]{3,48}[a-z0-9]$ ]] \
    || die "--kernel-id wants OWNER/slug (slug: 5-50 lowercase letters, digits, '-'), not '$KERNEL_ID'"
for src in ${EXTRA_SOURCES[@]+"${EXTRA_SOURCES[@]}"}; do
    [[ "$src" =~ ^[A-Za-z0-9_-]+/[A-Za-z0-9_-]+$ ]] || die "--extra-dataset wants OWNER/slug, not '$src'"
done
[[ "$PLATFORM" =~ ^(manylinux_2_([0-9]+)|manylinux2014|manylinux2010|manylinux1)_([a-z0-9_]+)$ ]] \
    || die "--platform wants a manylinux tag such as manylinux_2_28_x86_64 or manylinux2014_x86_64, not '$PLATFORM'"
# pip takes the listed tags literally: list every manylinux tag up to the one asked for.
case "${BASH_REMATCH[1]}" in
    manylinux2014) GLIBC_MINOR=17 ;; manylinux2010) GLIBC_MINOR=12 ;; manylinux1) GLIBC_MINOR=5 ;;
    *) GLIBC_MINOR="${BASH_REMATCH[2]}" ;;
esac
ARCH="${BASH_REMATCH[3]}"
PLATFORM_ARGS=()
for ((minor = GLIBC_MINOR; minor >= 5; minor--)); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_$ARCH"); done
(( GLIBC_MINOR < 17 )) || PLATFORM_ARGS+=(--platform "manylinux2014_$ARCH")
(( GLIBC_MINOR < 12 )) || PLATFORM_ARGS+=(--platform "manylinux2010_$ARCH")
PLATFORM_ARGS+=(--platform "manylinux1_$ARCH")
(( ${#TITLE} >= 6 && ${#TITLE} <= 50 )) || die "--title must have 6 to 50 characters (Kaggle's rule), not ${#TITLE}"

VERSION="$(sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' "$REPO/hpa_kernel/__init__.py")"
[[ -n "$VERSION" ]] || die "no __version__ = \"...\" line in $REPO/hpa_kernel/__init__.py"
WHEEL_NAME="hpa_kernel-$VERSION-py3-none-any.whl"

[[ -d "$WEIGHTS" ]] || die "weights folder '$WEIGHTS' not found (use --weights DIR)"
WEIGHTS="$(cd "$WEIGHTS" && pwd)"
[[ -f "$WEIGHTS/manifest.json" ]] \
    || die "$WEIGHTS/manifest.json not found: the kernel runs --weights <dataset>/weights/manifest.json (use --weights DIR)"

mkdir -p "$OUT" || die "cannot create output folder '$OUT'"
OUT="$(cd "$OUT" && pwd)"
[[ "$OUT" != "/" ]] || die "refusing to use / as the output folder"
case "$OUT/" in
    "$WEIGHTS"/*) die "--out ($OUT) must not be inside the weights folder ($WEIGHTS)" ;;
esac

DEP_LIST=()
read -r -a DEP_LIST <<< "${DEPS//,/ }" || true
for req in ${DEP_LIST[@]+"${DEP_LIST[@]}"}; do  # refused before anything slow runs
    base="$(echo "${req%%[<>=!~;[ ]*}" | tr '[:upper:]_.' '[:lower:]--')"
    for bad in "${FORBIDDEN_DEPS[@]}"; do
        [[ "$base" != "$bad" ]] || die "--deps must not name $bad: the Kaggle image brings its own CUDA build"
    done
done

command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (set PYTHON=...)"
"$PY" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null || die "'$PY' must be Python >= 3.9"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work: install pip"
"$PY" -c 'import setuptools' 2>/dev/null || die "setuptools is needed to build the wheel: $PY -m pip install 'setuptools>=70.1'"
# setuptools < 70.1 makes wheels only with the `wheel` package ("invalid command 'bdist_wheel'").
BUILD_ISOLATION=0
if ! "$PY" -c 'from setuptools.dist import Distribution; Distribution().get_command_class("bdist_wheel")' >/dev/null 2>&1; then
    st_version="$("$PY" -c 'import setuptools; print(setuptools.__version__)')"
    [[ "$WHEELHOUSE" == 1 ]] \
        || die "setuptools $st_version cannot build wheels without the 'wheel' package: $PY -m pip install wheel (or 'setuptools>=70.1'); or drop --no-wheelhouse to let pip fetch both"
    BUILD_ISOLATION=1
    log "setuptools $st_version cannot build wheels without the 'wheel' package: pip builds in an isolated environment (fetches setuptools and wheel)"
fi

# Wheelhouse requirements.
REQS=()
if [[ "$DEPS_SET" == 1 ]]; then
    REQS=(${DEP_LIST[@]+"${DEP_LIST[@]}"})
else
    for name in "${DEFAULT_DEPS[@]}"; do
        ver="$("$PY" -c 'import sys, importlib.metadata as m
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$name")"
        if [[ -n "$ver" ]]; then REQS+=("$name==$ver"); else REQS+=("$name"); fi
    done
fi

# ---------------------------------------------------------------- staging
STAGE="$(mktemp -d "$OUT/.build_wheel.XXXXXX")" || die "cannot create a staging folder in $OUT"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/src" "$STAGE/wheel" "$STAGE/wheelhouse"

# 1. A clean snapshot of the sources the wheel is built from: only what git tracks or
#    would track (no build/, *.egg-info, __pycache__ or other developers' stale
#    artefacts), so concurrent builds in the same tree never share a build folder.
SRC_PATHS=(setup.py setup.cfg pyproject.toml MANIFEST.in README.md LICENSE hpa_kernel)
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    ( cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- "${SRC_PATHS[@]}" \
        | while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - ) | tar -xf - -C "$STAGE/src"
    : "${SOURCE_DATE_EPOCH:=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 315532800)}"
else
    existing=()
    for p in "${SRC_PATHS[@]}"; do [[ -e "$REPO/$p" ]] && existing+=("$p"); done
    ( cd "$REPO" && tar --exclude='__pycache__' --exclude='*.pyc' --exclude='*.egg-info' -cf - "${existing[@]}" ) \
        | tar -xf - -C "$STAGE/src"
    : "${SOURCE_DATE_EPOCH:=315532800}"
fi
[[ -f "$STAGE/src/setup.py" && -f "$STAGE/src/hpa_kernel/__init__.py" ]] \
    || die "source snapshot is missing setup.py or hpa_kernel/__init__.py"
export SOURCE_DATE_EPOCH

# 2. The wheel: no dependencies; no build isolation and no index (works offline) unless
#    this setuptools cannot make wheels by itself (see the checks).
log "building $WHEEL_NAME (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
if [[ "$BUILD_ISOLATION" == 0 ]]; then
    build=(env PIP_NO_INDEX=1 "$PY" -m pip wheel --no-deps --no-build-isolation --no-index)
else
    build=("$PY" -m pip wheel --no-deps --use-pep517)  # older pips would run setup.py bdist_wheel here
fi
if ! ( cd "$STAGE/src" && "${build[@]}" --disable-pip-version-check -w "$STAGE/wheel" . ) >"$STAGE/wheel.log" 2>&1; then
    tail -n 40 "$STAGE/wheel.log" >&2
    [[ "$BUILD_ISOLATION" == 0 ]] || die "building the wheel in an isolated environment failed (log above); offline: $PY -m pip install wheel"
    die "building the wheel failed (log above)"
fi
[[ -f "$STAGE/wheel/$WHEEL_NAME" ]] || { ls -l "$STAGE/wheel" >&2; die "expected $WHEEL_NAME, pip made something else"; }

# 3. The wheel holds every module and data file of the package, and no weights.
"$PY" - "$STAGE/wheel/$WHEEL_NAME" "$STAGE/src" <<'PYEOF' || die "the wheel is incomplete (see above)"
import sys, zipfile
from pathlib import Path

wheel, src = Path(sys.argv[1]), Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
pkg = src / "hpa_kernel"
expected = {
    p.relative_to(src).as_posix()
    for p in pkg.rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
    and (p.suffix == ".py" or "data" in p.relative_to(pkg).parts[:1])
}
missing = sorted(expected - names)
for m in missing:
    print(f"  not in the wheel: {m}", file=sys.stderr)
if missing:
    print("  (a subpackage without __init__.py, or a data file outside hpa_kernel/data/?)", file=sys.stderr)
others = sorted(
    p.relative_to(src).as_posix()
    for p in pkg.rglob("*")
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"
    and "data" not in p.relative_to(pkg).parts[:1]
)
for o in sorted(set(others) - names):
    print(f"  warning: not in the wheel (package_data covers hpa_kernel/data/ only): {o}", file=sys.stderr)
stray = sorted(n for n in names if n.startswith("weights/") or n.endswith((".pt", ".pth")))
for s in stray:
    print(f"  must not be in the wheel: {s}", file=sys.stderr)
sys.exit(1 if missing or stray else 0)
PYEOF

# 4. The wheelhouse: for each Python version, the dependency closure of the wheel's own
#    requirements and of --deps, not entering KAGGLE_PROVIDED. For the Python version that
#    builds, a package installed here in a version the requirement allows is taken in that
#    version (what was tested here); otherwise pip picks the newest wheel for the target. `pip download --no-deps` fetches
#    each wheel; the edges come from the wheels' own metadata, their markers evaluated for
#    the target Python and platform. wheelhouse/requirements.txt lists what was carried.
if [[ "$WHEELHOUSE" == 1 ]]; then
    : >"$STAGE/wheelhouse/requirements.txt"
    for pyv in "${PY_LIST[@]}"; do
        log "wheelhouse for Python $pyv / $PLATFORM: closure of hpa_kernel's requirements${REQS[*]+ and ${REQS[*]}}"
        if ! "$PY" - "$STAGE/wheel/$WHEEL_NAME" "$STAGE/wheelhouse" "$pyv" "$ARCH" "${KAGGLE_PROVIDED[*]}" \
                ${REQS[@]+"${REQS[@]}"} -- "${PLATFORM_ARGS[@]}" <<'PYEOF' 2>"$STAGE/download.log"; then
import email.parser
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip always brings its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

args = sys.argv[1:]
cut = args.index("--")
(wheel, wheelhouse, pyv, arch, provided), roots, platform_args = args[:5], args[5:cut], args[cut + 1:]
wheelhouse = Path(wheelhouse)


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


explicit = {norm(Requirement(r).name) for r in roots}
provided = {norm(n) for n in provided.split()} - explicit  # named in --deps: carried anyway
here = ".".join(map(str, sys.version_info[:2]))
env = dict(default_environment(), python_version=pyv, platform_machine=arch, sys_platform="linux",
           platform_system="Linux", os_name="posix", implementation_name="cpython",
           platform_python_implementation="CPython")
if here != pyv:
    env["python_full_version"] = env["implementation_version"] = pyv + ".0"


def requires(path):
    """Requires-Dist of a wheel file."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(meta) != 1:
            fail(f"{path.name}: no single .dist-info/METADATA inside")
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def needed(text, extras, parent):
    """(requirement, parent) if it applies to the target with the parent's extras, else None."""
    req = Requirement(text)
    if req.marker is not None and not any(req.marker.evaluate(dict(env, extra=e)) for e in {"", *extras}):
        return None
    return req, parent


chosen = {}  # name -> (version, wheel file, extras handled)
edges = [needed(r, (), "hpa_kernel") for r in requires(Path(wheel))] + [needed(r, (), "--deps") for r in roots]
taken = set()
while True:
    level = {}
    for req, parent in filter(None, edges):
        name = norm(req.name)
        if name in provided:
            taken.add(name)
            continue
        spec, extras, parents = level.get(name, (SpecifierSet(), set(), []))
        level[name] = (spec & req.specifier, extras | set(req.extras), parents + [f"{parent} ({req})"])
    edges = []
    todo = {}
    for name, (spec, extras, parents) in level.items():
        if name in chosen:
            version, path, done = chosen[name]
            if not spec.contains(version, prereleases=True):
                fail(f"{name} {version} was chosen, but {'; '.join(parents)} needs {name}{spec}: pin it with --deps")
            if extras - done:  # new extras: their requirements too
                chosen[name] = (version, path, done | extras)
                edges += [needed(r, extras - done, name) for r in requires(path)]
            continue
        try:  # the version installed here, when the target is this Python (others may not support it)
            mine = md.version(name) if pyv == here else None
        except md.PackageNotFoundError:
            mine = None
        todo[name] = (f"{name}=={mine}" if mine and spec.contains(mine, prereleases=True) else f"{name}{spec}", extras)
    if not todo:
        break
    with tempfile.TemporaryDirectory(dir=wheelhouse.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--python-version", pyv, "--implementation", "cp", *platform_args, "-d", tmp,
               *(r for r, _ in todo.values())]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            fail(r.stdout[-4000:] + f"\npip download failed for {' '.join(r for r, _ in todo.values())}")
        for f in sorted(Path(tmp).glob("*.whl")):
            name, version = norm(f.name.split("-")[0]), f.name.split("-")[1]
            if name not in todo:
                fail(f"pip download brought {f.name}, which was not asked for")
            dest = wheelhouse / f.name
            if not dest.exists():
                shutil.move(str(f), dest)
            extras = todo.pop(name)[1]
            chosen[name] = (version, dest, extras)
            edges += [needed(r, extras, name) for r in requires(dest)]
        if todo:
            fail(f"no wheel came for {', '.join(r for r, _ in todo.values())}")
with open(wheelhouse / "requirements.txt", "a") as f:
    for name in sorted(chosen):
        f.write(f'{name}=={chosen[name][0]} ; python_version == "{pyv}"\n')
print(f"  Python {pyv}: {len(chosen)} wheels: " + ", ".join(f"{n}=={chosen[n][0]}" for n in sorted(chosen)), file=sys.stderr)
print(f"  Python {pyv}: from the Kaggle image: {', '.join(sorted(taken))}", file=sys.stderr)
PYEOF
            tail -n 30 "$STAGE/download.log" >&2
            die "the wheelhouse for Python $pyv failed (log above); without network use --no-wheelhouse"
        fi
        cat "$STAGE/download.log" >&2
    done
else
    log "wheelhouse: skipped (--no-wheelhouse); the kernel relies on the Kaggle image's packages"
fi

# 5. The Kaggle dataset folder.
DS="$STAGE/kaggle_dataset"
mkdir -p "$DS/wheelhouse" "$DS/weights"
cp "$STAGE/wheel/$WHEEL_NAME" "$DS/"
if compgen -G "$STAGE/wheelhouse/*" >/dev/null; then cp "$STAGE/wheelhouse/"* "$DS/wheelhouse/"; fi
( cd "$WEIGHTS" && tar --exclude='__pycache__' --exclude='*.pyc' --exclude='.DS_Store' --exclude='.git*' -cf - . ) \
    | tar -xf - -C "$DS/weights"
if [[ "$WEIGHTS_CHECK" == 1 ]]; then
    if ! PYTHONPATH="$STAGE/src" "$PY" -m hpa_kernel.integrity --manifest "$DS/weights/manifest.json" \
            --allow-outside-paths --inside-only -q; then
        die "the weights in $WEIGHTS do not match manifest.json (run: python -m hpa_kernel.integrity --manifest $WEIGHTS/manifest.json --update; or --no-weights-check)"
    fi
fi
# Every classifier the dataset carries must load with the kernel's own loader: a file the
# kernel would refuse (e.g. a training state last.pt) stops the build here, with its reason.
if [[ "$WEIGHTS_CHECK" == 1 ]] && ! PYTHONPATH="$STAGE/src" "$PY" - "$DS/weights/manifest.json" <<'PYEOF'
import sys
from pathlib import Path

try:
    from hpa_kernel.config import ConfigError, load_config
    from hpa_kernel.stages.model import CheckpointError
    from hpa_kernel.stages.predictor import load_classifier
except ImportError as e:
    sys.exit(f"build_wheel.sh: error: cannot test-load the classifiers with {sys.executable} ({e}): "
             "build with a Python that has torch and timm (PYTHON=...), or --no-weights-check")
try:
    config = load_config(sys.argv[1], allow_outside=True)
except ConfigError as e:
    sys.exit(f"build_wheel.sh: error: {e}")
bad = 0
for c in config.classifiers:
    root = Path(sys.argv[1]).parent
    if any(not Path(p).is_file() and not Path(p).is_relative_to(root) for p in c.paths):
        print(f"build_wheel.sh: classifier {c.name}: not here (outside the dataset), not test-loaded", file=sys.stderr)
        continue
    try:
        meta = load_classifier(c).meta  # the kernel's own loader, in the entry's format
    except CheckpointError as e:
        print(f"build_wheel.sh: error: the kernel cannot load classifier {e}", file=sys.stderr)
        bad += 1
        continue
    print(f"build_wheel.sh: classifier {c.name}: loads ({meta['backbone']}, "
          f"{meta['image_size']} px, crops {meta['crop_size']} px, input {meta.get('input', 'hpa_kernel')})", file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
then
    die "a classifier of $WEIGHTS/manifest.json cannot be loaded by the kernel (reason above; a run's last.pt is a training state: use its best.pt or last_model.pt)"
fi
"$PY" - "$DS/dataset-metadata.json" "$TITLE" "$DATASET_ID" "$LICENSE" <<'PYEOF'
import json, sys
path, title, ds_id, lic = sys.argv[1:5]
meta = {"title": title, "id": ds_id, "licenses": [{"name": lic}]}
with open(path, "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
PYEOF

# 6. The kernel folder (submission/ with the ids filled in).
KD="$STAGE/kaggle_kernel"
mkdir -p "$KD"
[[ -f "$REPO/submission/kernel.py" && -f "$REPO/submission/kernel-metadata.json" ]] \
    || die "submission/kernel.py or submission/kernel-metadata.json is missing"
cp "$REPO/submission/kernel.py" "$KD/kernel.py"
"$PY" - "$REPO/submission/kernel-metadata.json" "$KD/kernel-metadata.json" "$KERNEL_ID" "$DATASET_ID" \
    ${EXTRA_SOURCES[@]+"${EXTRA_SOURCES[@]}"} <<'PYEOF'
import json, sys
src, dst, kernel_id, ds_id = sys.argv[1:5]
meta = json.load(open(src))
meta["id"] = kernel_id
meta["title"] = kernel_id.split("/", 1)[1]  # the title must resolve to the slug
extra = [d for d in sys.argv[5:] if d]
keep = [d for d in meta.get("dataset_sources", []) if not d.startswith("USERNAME/") and d != ds_id]
meta["dataset_sources"] = list(dict.fromkeys([ds_id, *keep, *extra]))
with open(dst, "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
PYEOF

# ---------------------------------------------------------------- swap in
rm -rf "$OUT/wheelhouse" "$OUT/kaggle_dataset" "$OUT/kaggle_kernel"
rm -f "$OUT"/hpa_kernel-*.whl
mv "$STAGE/wheel/$WHEEL_NAME" "$OUT/"
mv "$STAGE/wheelhouse" "$OUT/wheelhouse"
mv "$DS" "$OUT/kaggle_dataset"
mv "$KD" "$OUT/kaggle_kernel"

log "done:"
( cd "$OUT" && find "$WHEEL_NAME" wheelhouse kaggle_dataset kaggle_kernel -type f -exec ls -l {} + \
    | awk '{printf "  %12s  %s\n", $5, $NF}' ) >&2
[[ "$OWNER" != "USERNAME" ]] || log "note: dataset id is $DATASET_ID: pass --dataset-id <your kaggle name>/hpa-kernel before uploading"
log "next: kaggle datasets create -p $OUT/kaggle_dataset --dir-mode zip   (then: kaggle kernels push -p $OUT/kaggle_kernel)"
