#!/usr/bin/env bash
# Rank sweep: LoRA, GoRA and full fine-tuning at r = 2, 8, 32, 64 (alpha = 2r) on Rotten Tomatoes.
# Its own folder, never mixed into the grid's averages.
set -euo pipefail
OUT=${OUT:-benchmarks/results/cpu/rank-sweep}
python -m gora.bench rank-sweep --task rotten_tomatoes --ranks 2 8 32 64 --seeds 0 \
  --max-train 3200 --max-val 500 --out-dir "$OUT" "$@"
