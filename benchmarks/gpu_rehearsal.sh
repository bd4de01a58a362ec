#!/usr/bin/env bash
# The GPU rehearsal of stages 02-04 at SDXL 1.0's real shapes (full-random: random weights, no download), as one
# script: notebooks 02, 03 and 04 through the runner with `colab`'s settings under a T4's 14.7 GiB
# (torch.cuda.set_per_process_memory_fraction, via JPSDXL_GPU_CAP_GIB), then with `full`'s under an A100-40's 40
# GiB. Aimed at under 8 minutes on an H100; not yet run on any card. Run from the repository root on a GPU machine
# (wheels for missing packages in .whl/, the Tatoeba archive in $JPSDXL_CACHE/data: see gpu_check_distill.sh).
# Prints each notebook's seconds and the kernel's peak host memory; 03's metrics.json holds the GPU peak.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${OUT:-/tmp}/gpu-rehearsal"
for card in "colab 14.7" "a100 40"; do
  set -- $card
  JPSDXL_GPU_CAP_GIB=$2 python3 -m jpsdxl.cli run --profile "benchmarks/profiles/gpu-$1.toml" --only 02 03 04 \
    --runs "$out" --no-html
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); [print(sys.argv[2], r['notebook'], r['seconds'], 's',
    r.get('peak_rss_mb'), 'MiB host') for r in s['notebooks']]" "$out/gpu-$1/summary.json" "$1"
done
