#!/usr/bin/env bash
# One prepared GPU check: the CUDA/fp16 path and per-stage timings of the pipeline on a few
# synthetic 2048² images (full-size DPN U-Nets with random weights, seresnext50_32x4d fp16).
# Usage (on a CUDA machine, from the repository root): bash bench/gpu.sh [--images 4]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pip install -q --no-deps -e . 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python bench/gpu_pipeline.py "$@"
