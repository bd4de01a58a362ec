#!/usr/bin/env bash
# The GPU check, as one script: build SDXL 1.0's real shapes with random weights (profile full-random) and
# time a two-stage 1024x1024 generation in fp16. Needs no download. Run from the repository root on a GPU
# machine; wheels for packages the machine lacks may be placed in .whl/ (diffusers, open_clip_torch, ...).
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" JPSDXL_CACHE="${JPSDXL_CACHE:-/tmp/jpsdxl-cache}" HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)"
start=$(date +%s)
python3 -c "from jpsdxl.hub import resolve; print(resolve('zoo:sdxl/base'))"
echo "zoo:sdxl built in $(( $(date +%s) - start )) s"
python3 benchmarks/generation_speed.py --profile full-random --images 1
python3 benchmarks/generation_speed.py --profile full-random --images 4
