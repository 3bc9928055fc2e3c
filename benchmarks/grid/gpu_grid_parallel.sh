#!/usr/bin/env bash
# The published H100 grid: 12 methods x 4 tasks x 3 seeds, one process per method sharing the GPU
# (MiniLM steps are launch-bound, so a dozen processes keep one H100 busy).
#   here:   python -m gora.bench export-assets --out-dir gpu_assets      (48.6 MB, git-ignored)
#   device: carry ["gpu_assets"], then: GRID_OUT=runs/h100-grid bash benchmarks/grid/gpu_grid_parallel.sh
# Every method gets its own grid folder (merge them with benchmarks/grid/merge_results.py); each is resumable,
# so a second call with the folders carried back finishes what a first call's time limit cut off.
# Epistemic has 1,440 training pairs, so it trains 4 epochs (180 steps); the other tasks 6,400 examples, 1 epoch (200 steps).
set -uo pipefail
export GORA_DATA_DIR=${GORA_DATA_DIR:-gpu_assets} PYTHONPATH=${PYTHONPATH:-src} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GRID_OUT=${GRID_OUT:-runs/h100-grid}
BUDGET=${BUDGET:-520}            # seconds for every method's process, then it is stopped (resumable)
DEVICE=${DEVICE:-cuda}
MAX_TRAIN=${MAX_TRAIN:-6400}
SEEDS=${SEEDS:-0 1 2}
TASKS=${TASKS:-rotten_tomatoes vitaminc multiemo}
METHODS=${METHODS:-full lora rslora dora loraplus pissa olora loraga eva adalora gora gora_loraplus}
PRECISION=$([ "$DEVICE" = cuda ] && echo --bf16)
COMMON="--seeds $SEEDS --max-val 1000 --max-length 128 --batch-size 32 --device $DEVICE $PRECISION --no-progress --no-report --threads 1 ${EXTRA:-}"
mkdir -p "$GRID_OUT/logs"
deadline=$((SECONDS + BUDGET))
for m in $METHODS; do
  (
    timeout $((deadline - SECONDS)) python -m gora.bench grid --protocol 1 --methods "$m" --tasks epistemic --epochs 4 \
      --max-train "$MAX_TRAIN" $COMMON --out-dir "$GRID_OUT/$m/epistemic"
    timeout $((deadline - SECONDS)) python -m gora.bench grid --protocol 1 --methods "$m" --tasks $TASKS --max-train "$MAX_TRAIN" \
      --epochs 1 $COMMON --out-dir "$GRID_OUT/$m/main"
  ) >"$GRID_OUT/logs/$m.log" 2>&1 &
done
wait
python -c "import glob, json; print('cells done:', sum(len(json.load(open(f))) for f in glob.glob('$GRID_OUT/*/*/results.json')))"
