#!/usr/bin/env bash
# Issue #5: what does the memory-light sketch estimator cost in quality? GoRA three ways, same everything else:
#   full/mean_abs  - the default (exact mean gradient, importance mean|W ⊙ Ḡ|)
#   full/frobenius - exact mean gradient, Frobenius importance (the sketch's importance, computed exactly)
#   sketch/frobenius - GoraConfig(estimator="sketch", importance="frobenius")
# on Rotten Tomatoes then MultiEmo, seeds 0-2, one fixed learning rate (GoRA's demo rate, not tuned per config).
# Each (task, config) is a resumable grid folder under runs/sketch-quality/; the merged table goes to OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/sketch-quality}
OUT=${OUT:-benchmarks/results/cpu/sketch-quality}
THREADS=${THREADS:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
declare -A FLAGS=(
  [full-mean_abs]="--gora-estimator full --gora-importance mean_abs"
  [full-frobenius]="--gora-estimator full --gora-importance frobenius"
  [sketch-frobenius]="--gora-estimator sketch --gora-importance frobenius"
)
CONFIGS=(full-mean_abs full-frobenius sketch-frobenius)
for task in ${TASKS:-rotten_tomatoes multiemo}; do
  for config in "${CONFIGS[@]}"; do
    # shellcheck disable=SC2086
    python -m gora.bench grid --protocol 1 --methods gora --tasks "$task" --seeds 0 1 2 \
      --max-train 3200 --max-val 256 --max-test 1000 --epochs 2 --batch-size 32 --max-length 64 \
      --gora-steps 32 --threads "$THREADS" --no-progress --lr gora=5e-4 ${FLAGS[$config]} \
      --out-dir "$RUNS/$task/$config" --no-report
  done
done
SOURCES=()
for task in ${TASKS:-rotten_tomatoes multiemo}; do
  for config in "${CONFIGS[@]}"; do
    [ -f "$RUNS/$task/$config/results.json" ] && SOURCES+=("$RUNS/$task/$config={method} $config")
  done
done
python benchmarks/grid/merge_results.py "${SOURCES[@]}" "$OUT"
