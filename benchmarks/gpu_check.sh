#!/usr/bin/env bash
# The GPU check, as one script: build SDXL 1.0's real shapes with random weights (profile full-random) and
# time a two-stage 1024x1024 generation in fp16. Needs no download. Run from the repository root on a GPU
# machine; wheels for packages the machine lacks may be placed in .whl/ (diffusers, open_clip_torch, ...).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)"
start=$(date +%s)
python3 -c "from jpsdxl.core.models import resolve; print(resolve('zoo:sdxl/base'))"
echo "zoo:sdxl built in $(( $(date +%s) - start )) s"
python3 benchmarks/generation_speed.py --profile full-random --images 1
python3 benchmarks/generation_speed.py --profile full-random --images 4
# the card's example settings (100 steps, 1024², guidance 7.5, hand-off 0.8) against diffusers' speed-ups
python3 benchmarks/generation_card_vs_fast.py --profile full-random --steps 100 --images 1 --compile
