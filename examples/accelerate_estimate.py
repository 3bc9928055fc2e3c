"""GoRA with Hugging Face Accelerate: estimate on each process's shard, then ``accelerator.prepare``.

    # CPU processes (gloo): launch with torchrun; Accelerator() picks up its environment
    python -m torch.distributed.run --nproc_per_node 2 examples/accelerate_estimate.py --output runs/gora_state
    # GPUs
    accelerate launch --num_processes 8 examples/accelerate_estimate.py --model DIR --data train.csv --output ...

The order matters: ``accelerator.prepare`` the *data loader* first (it shards the batches), run
``estimate_gora`` on the bare model, ``apply_gora``, and only then create the optimizer and
``prepare`` model and optimizer. ``--num-steps`` counts batches per process. For FSDP/DeepSpeed
ZeRO-3 plugins, estimate once in a plain process, save the state, and have every process call
``apply_gora(model, lora_config, GoraState.load(dir))`` before ``prepare``.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig
from torch.utils.data import DataLoader

from _shared import adapter_checksum, add_model_args, model_and_dataset
from gora import GoraConfig, apply_gora, estimate_gora

logger = logging.getLogger("accelerate_estimate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="directory for the GoraState (written by the main process)")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps after GoRA (default 2)")
    args = parser.parse_args()

    one_gpu_each = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    accelerator = Accelerator(cpu=not one_gpu_each)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format=f"[process {accelerator.process_index}] %(message)s")
    model, examples, collator, task_type = model_and_dataset(args)
    model.to(accelerator.device)
    loader = accelerator.prepare(DataLoader(examples, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                            drop_last=True, generator=torch.Generator().manual_seed(args.seed)))
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task_type)

    state = estimate_gora(model, lora_config, loader, gora_config=GoraConfig(num_steps=args.num_steps, seed=args.seed))
    if accelerator.is_main_process:
        state.save(args.output)
        logger.info("%s\nsaved GoRA state to %s (%d steps over %d processes)", state.summary(), args.output,
                    state.num_steps, accelerator.num_processes)

    peft_model = apply_gora(model, lora_config, state)
    checksums = [adapter_checksum(peft_model)]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    prepared, optimizer = accelerator.prepare(peft_model, optimizer)
    prepared.train()
    for step, batch in zip(range(args.train_steps), loader):
        loss = prepared(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        logger.info("train step %d: loss %.4f", step, loss.item())
    checksums.append(adapter_checksum(accelerator.unwrap_model(prepared)))
    everyone = gather_object([checksums])
    identical = all(c == everyone[0] for c in everyone)
    logger.info("adapters identical on all %d processes after apply_gora and after training: %s",
                accelerator.num_processes, identical)
    # drop every reference to the DDP wrapper (the Accelerator keeps one too) before end_training() destroys the
    # process group: a wrapper that outlives its group tears down gloo's threads at interpreter exit, where that can
    # abort the process ("terminate called without an active exception") after all the work is done
    prepared, optimizer = accelerator.free_memory(prepared, optimizer)
    # leave together; not accelerator.wait_for_everyone(): on CPU processes it passes device_ids to the barrier,
    # which fails where fewer GPUs than processes are visible
    torch.distributed.barrier()
    accelerator.end_training()
    if not identical:
        raise SystemExit(f"process {accelerator.process_index}: adapters differ between processes")


if __name__ == "__main__":
    main()
