#!/usr/bin/env bash
# CPU grid (2 cores): every method x the four tasks x 3 seeds on MiniLM, reduced sizes.
# Cost at ~0.5 s per step: 2,000 training examples = 63 steps per run; with the 4-value lr search on seed 0
# (DEFAULT_LR_GRID in gora/bench/grid.py) that is 12 methods x 4 tasks x 6 runs = 288 runs, an estimated 3.5 to 5
# hours (not timed since the grid went from 3 to 4 rates). Resumable: rerun the same command.
set -euo pipefail
OUT=${OUT:-benchmarks/results/cpu/grid}
python -m gora.bench grid --protocol 1 \
  --methods full lora rslora dora loraplus pissa olora loraga eva adalora gora gora_loraplus \
  --tasks rotten_tomatoes vitaminc multiemo epistemic \
  --seeds 0 1 2 \
  --max-train 2000 --max-val 500 --max-test 1000 \
  --max-length 64 --batch-size 32 --epochs 1 \
  --out-dir "$OUT" "$@"
