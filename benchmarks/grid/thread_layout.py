"""Throughput of one worker layout: STEPS LoRA training steps of MiniLM (batch 16 x 64 tokens) on THREADS threads.

Run two of these at once with --threads 1 against one with --threads 2 and twice the steps to see which layout
trains more steps per second on a 2-core machine (benchmarks/results/cpu/thread-layout/README.md has the command).
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from gora.bench.assets import default_model_path, load_classifier, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
path = default_model_path()
tokenizer, model = load_tokenizer(path), load_classifier(path, 2)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                                         task_type="SEQ_CLS"))
batch = tokenizer(["a sentence of moderate length about a film that was fine " * 6] * 16, truncation=True,
                  max_length=64, padding=True, return_tensors="pt")
batch["labels"] = torch.zeros(16, dtype=torch.long)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
start = time.perf_counter()
for _ in range(args.steps):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"threads={args.threads} steps={args.steps} seconds={time.perf_counter() - start:.2f}")
