#!/usr/bin/env bash
# Builds the hpa_kernel wheel, the wheelhouse of runtime wheels a Kaggle GPU image may lack and
# the folders for `kaggle datasets create` / `kaggle kernels push` (dist/ by default). The work is
# done by submission/build.py, run with $PYTHON (default python3), the interpreter that builds:
# `bash build_wheel.sh --help` lists the options.
set -euo pipefail
PY="${PYTHON:-python3}"
die() { echo "build_wheel.sh: error: $*" >&2; exit 1; }
command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found (set PYTHON=...)"
"$PY" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null || die "'$PY' must be Python >= 3.9"
exec "$PY" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/submission/build.py" "$@"
