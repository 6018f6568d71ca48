#!/usr/bin/env bash
# On the GPU machine (device tool, carry build/gpu-wheels): install the carried wheels next to the image's
# torch, print what the machine is, then run "$@" with the image's python3 from the repository root.
#   bash benchmarks/gpu_run.sh python3 -m pytest tests/gpu -q -rs
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/gpu-wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
"$@"
