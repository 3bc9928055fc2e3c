#!/usr/bin/env bash
# How the demo's fixed learning rates were chosen: the demo's sizes, 4 rates per method, picked on validation.
# Ran on the H100 (fp32, 2 min); on 2 CPU cores it takes about 40 minutes.
set -euo pipefail
OUT=${OUT:-runs/demo-lr}
python -m gora.bench grid --protocol 1 --methods lora gora --tasks rotten_tomatoes --seeds 0 \
  --max-train 6400 --max-val 500 \
  --lr lora=2e-4,5e-4,1e-3,2e-3 --lr gora=1e-4,2e-4,5e-4,1e-3 \
  --out-dir "$OUT" "$@"
