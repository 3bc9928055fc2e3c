#!/usr/bin/env bash
# Protocol-2 evidence grid on MiniLM, sized for 2 CPU cores: the ten controlled arms (lora, rslora, rslora_loraplus,
# gora, gora_loraplus, gora_gamma0, gora_fixed_rank, gora_head_warmup, gora_adaptive_gamma, gora_warmup_adaptive) on
# rotten_tomatoes, tweet_sentiment, yahoo_answers and clinc150, in that order.
#   bash benchmarks/grid/cpu_evidence.sh OUT_DIR [extra grid options]
# Sizes: 200 steps at batch 16 (3,200 training examples, one pass: --max-train 3200), 64 tokens, validation capped at
# 500 examples (curve at steps 25, 50, 100, 200), test at 1,000; r = 8, alpha = 16; head lr 1e-3 for every arm;
# lr per arm and task chosen on mean validation loss over selection seeds 100 and 101 (4-point factor-2 grid,
# extended past an edge up to 3 times), then test seeds 0-4. That is (8 selection + 5 test) runs per arm and task,
# 520 runs before extensions.
# Timed on Rotten Tomatoes at these sizes, 1 thread, on a 2-core machine that other jobs kept at a load of about 6:
# one lora run 238 s (training 180 s, the four validation passes 38 s, rest test and model load), one gora run 229 s
# (estimation and init diagnostics 29 s, training 147 s, validation 34 s). At ~230 s per run the 520 runs take
# about 17 hours on the two workers; on an otherwise idle machine expect less (time a run before planning).
# Two worker processes with one thread each share the folder (two single-thread processes beat one two-thread
# process on small models); each takes every other (task, arm) and both merge into OUT_DIR/results.json.
# Resumable: rerun the same command; finished runs are never recomputed. Table and plots at the end
# (python -m gora.bench report OUT_DIR). Run it from a separate worktree so code changes do not touch a running study.
set -euo pipefail
OUT=${1:?usage: cpu_evidence.sh OUT_DIR [extra grid options]}
shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT/logs"
pids=()
for worker in 0 1; do
  python -m gora.bench grid \
    --tasks rotten_tomatoes tweet_sentiment yahoo_answers clinc150 \
    --arms lora rslora rslora_loraplus gora gora_loraplus gora_gamma0 gora_fixed_rank gora_head_warmup \
           gora_adaptive_gamma gora_warmup_adaptive \
    --steps 200 --batch-size 16 --max-length 64 --max-train 3200 --max-val 500 --max-test 1000 \
    --selection-seeds 100 101 --seeds 0 1 2 3 4 --head-lr 1e-3 \
    --worker "$worker/2" --threads 1 --no-progress \
    --out-dir "$OUT" "$@" >>"$OUT/logs/worker$worker.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] && python -m gora.bench report "$OUT"
exit "$status"
