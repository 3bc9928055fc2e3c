#!/usr/bin/env bash
# GPU grid: the full grid at larger sizes. Run on the GPU machine after shipping the assets:
#   here:   python -m gora.bench export-assets --out-dir gpu_assets      (48.6 MB, git-ignored)
#   device: carry ["gpu_assets"], then: bash benchmarks/grid/gpu_grid.sh
# One H100 trains 200 steps of batch 32 in about 8 s; the model load and evaluation add a few seconds per run.
set -euo pipefail
export GORA_DATA_DIR=${GORA_DATA_DIR:-gpu_assets}
OUT=${OUT:-$HOME/out/h100-grid}
python -m gora.bench grid --protocol 1 \
  --methods full lora rslora dora loraplus pissa olora loraga eva adalora gora gora_loraplus \
  --tasks rotten_tomatoes vitaminc multiemo epistemic \
  --seeds 0 1 2 \
  --max-train 20000 --max-val 1000 \
  --max-length 128 --batch-size 32 --epochs 1 \
  --device cuda --bf16 --no-progress \
  --out-dir "$OUT" "$@"
