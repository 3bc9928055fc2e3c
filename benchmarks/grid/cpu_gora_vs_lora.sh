#!/usr/bin/env bash
# The CPU grid published from a 2-core session: GoRA vs LoRA (the grid's first two methods) on the four
# tasks x 3 seeds, at 200 optimizer steps per run (shorter runs leave MiniLM predicting one class).
# About 2 minutes per run on 2 idle cores; 2 methods x 4 tasks x (2 lr-search runs + 2 more seeds) = 32 runs.
# Resumable, and extendable: rerun with more --methods into the same folder (the sizes must stay the same).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/cpu/grid}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m gora.bench grid --protocol 1 \
  --methods lora gora \
  --tasks rotten_tomatoes epistemic vitaminc multiemo \
  --seeds 0 1 2 \
  --max-train 3200 --max-val 256 --max-test 1000 --epochs 2 --batch-size 32 --max-length 64 \
  --gora-steps 16 --threads 2 --no-progress \
  --lr lora=5e-4,1e-3 --lr gora=2e-4,5e-4 \
  --out-dir "$OUT" "$@"
