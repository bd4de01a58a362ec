#!/usr/bin/env bash
# Stage 3's GPU checks, as one script (issue #10): training throughput, MFU and peak memory of both full-size
# students (SDXL 1.0's ViT-L + bigG text towers, random weights: profile full-random, no download), with
# (1) the fast settings of a large card: bf16 autocast, fused AdamW;
# (2) the 16 GB settings of full.toml (fp16 autocast, gradient checkpointing, 8-bit AdamW) under a 15 GiB cap
#     (torch.cuda.set_per_process_memory_fraction), standing in for a T4.
# Run from the repository root on a GPU machine (wheels for missing packages may be placed in .whl/, as
# gpu_check.sh does). The GPU machine is offline: copy ~/.cache/jpsdxl/data (the Tatoeba archive) into
# $JPSDXL_CACHE/data first (e.g. carry it in the repository folder). Results are appended to
# benchmarks/results/distillation_speed.json, which notebook 03's cost table reads.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 benchmarks/distillation_speed.py --profile full-random --steps 10 --set init='"mean"'
python3 benchmarks/distillation_speed.py --profile full-random --steps 5 --cap-gib 14.5 \
  --set mixed_precision='"fp16"' gradient_checkpointing=true optimizer='"adamw8bit"' batch_size=16 init='"mean"'
