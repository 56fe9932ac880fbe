#!/usr/bin/env bash
# Build everything the offline Kaggle kernel needs:
#
#   OUT/hpa_kernel-<version>-py3-none-any.whl   the package (no weights inside)
#   OUT/wheelhouse/                             runtime wheels a Kaggle GPU image may lack
#   OUT/kaggle_dataset/                         wheel + wheelhouse/ + weights/ + dataset-metadata.json,
#                                               ready for `kaggle datasets create -p OUT/kaggle_dataset --dir-mode zip`
#   OUT/kaggle_kernel/                          submission/kernel.py + kernel-metadata.json naming that dataset,
#                                               ready for `kaggle kernels push -p OUT/kaggle_kernel`
#
# Idempotent: everything is built in a staging folder and swapped in at the end; stale
# wheels and folders of earlier runs are removed. The wheel is reproducible
# (SOURCE_DATE_EPOCH = time of the last commit unless set).
#
# Usage: bash build_wheel.sh [--python 3.10[,3.11]] [--platform manylinux2014_x86_64] [--out dist]
#                            [--deps "timm pycocotools"] [--no-wheelhouse]
#                            [--weights weights] [--dataset-id USERNAME/hpa-kernel]
#                            [--title TITLE] [--license other] [--kernel-id USER/hpa-kernel-submit]
#                            [--extra-dataset OWNER/SLUG] [--no-weights-check]
# Environment: PYTHON (the interpreter that builds; default python3).
set -euo pipefail

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
  --platform TAG       platform tag for the wheelhouse (default manylinux2014_x86_64)
  --deps "A B==1.0"    wheelhouse requirements, space or comma separated, replacing the default
                       list (timm pycocotools, pinned to the versions installed here when they
                       are); torch/torchvision/torchaudio are refused: Kaggle brings its own
  --no-wheelhouse      do not download anything (offline / CI): the wheelhouse stays empty
  --offline            same as --no-wheelhouse
  --weights DIR        weights folder copied into the dataset (default: <repo>/weights);
                       must hold manifest.json
  --no-weights-check   do not check the copied weights against the manifest's sizes/sha256
  --dataset-id ID      Kaggle dataset id OWNER/SLUG (default USERNAME/hpa-kernel)
  --title TITLE        dataset title, 6-50 characters (default "hpa-kernel wheel and weights")
  --license NAME       dataset license name (default "other")
  --kernel-id ID       Kaggle kernel id OWNER/SLUG (default <dataset owner>/hpa-kernel-submit)
  --extra-dataset ID   another dataset the kernel attaches (repeatable), e.g. the one holding
                       the HPA segmentation weights
  -h, --help           this help

Environment: PYTHON = interpreter used to build (default python3). SOURCE_DATE_EPOCH
(default: time of the last git commit) fixes the timestamps inside the wheel.
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
PY_VERSIONS="3.10,3.11,3.12"
PLATFORM="manylinux2014_x86_64"
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
"$PY" -c 'import setuptools' 2>/dev/null || die "setuptools is needed to build the wheel: $PY -m pip install setuptools wheel"

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

# 2. The wheel: no dependencies, no build isolation, no index (works offline).
log "building $WHEEL_NAME (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
if ! ( cd "$STAGE/src" && PIP_NO_INDEX=1 "$PY" -m pip wheel --no-deps --no-build-isolation --no-index \
        --disable-pip-version-check -w "$STAGE/wheel" . ) >"$STAGE/wheel.log" 2>&1; then
    tail -n 40 "$STAGE/wheel.log" >&2
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

# 4. The wheelhouse.
if [[ "$WHEELHOUSE" == 1 && ${#REQS[@]} -gt 0 ]]; then
    for pyv in "${PY_LIST[@]}"; do
        log "wheelhouse for Python $pyv / $PLATFORM: ${REQS[*]}"
        if ! "$PY" -m pip download --only-binary=:all: --no-deps --disable-pip-version-check \
                --python-version "$pyv" --platform "$PLATFORM" --implementation cp \
                -d "$STAGE/wheelhouse" "${REQS[@]}" >"$STAGE/download.log" 2>&1; then
            tail -n 30 "$STAGE/download.log" >&2
            die "downloading the wheelhouse for Python $pyv failed (log above); without network use --no-wheelhouse"
        fi
    done
elif [[ "$WHEELHOUSE" == 1 ]]; then
    log "wheelhouse: --deps is empty, nothing to download"
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
