"""GoRA under torchrun (DDP): each process estimates on its own shard; all end with the same adapters.

    python -m torch.distributed.run --nproc_per_node 2 examples/torchrun_estimate.py --output runs/gora_state
    python -m torch.distributed.run --nproc_per_node 8 examples/torchrun_estimate.py \
        --model path/to/model --data train.csv --num-steps 32 --output runs/gora_state

With a GPU per process they talk over NCCL, else CPU processes over gloo. What happens:

1. every process builds the same base model; a ``DistributedSampler`` gives each its own batches;
2. ``estimate_gora`` on the *bare* model (wrap in DDP only afterwards: DDP would all-reduce every
   estimation step): each process accumulates its shard, then one all-reduce per layer; rank 0
   allocates the ranks and broadcasts them and C; A comes from the shared seed. ``--num-steps``
   counts steps per process: P processes × N steps = one process with ``num_steps = P·N``;
3. rank 0 saves the state (for FSDP/ZeRO-3, load it on every rank: ``apply_gora(model, lora_config,
   GoraState.load(dir))``);
4. ``apply_gora`` on every process, DDP wrap, a few training steps; the script checks that the
   adapters are identical on every process before and after training.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from _shared import adapter_checksum, add_model_args, model_and_dataset
from gora import GoraConfig, apply_gora, estimate_gora

logger = logging.getLogger("torchrun_estimate")


def same_on_every_process(value: str) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


def train(peft_model: torch.nn.Module, loader: DataLoader, device: torch.device, steps: int) -> None:
    ddp_model = DistributedDataParallel(peft_model)
    optimizer = torch.optim.AdamW([p for p in ddp_model.parameters() if p.requires_grad], lr=1e-3)
    ddp_model.train()
    for step, batch in zip(range(steps), loader):
        loss = ddp_model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logger.info("train step %d: loss %.4f", step, loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--output", required=True, help="directory for the GoraState (written by rank 0)")
    parser.add_argument("--train-steps", type=int, default=2, help="DDP training steps after GoRA (default 2)")
    args = parser.parse_args()

    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # one GPU per process
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s")

    model, examples, collator, task_type = model_and_dataset(args)
    model.to(device)
    sampler = DistributedSampler(examples, shuffle=True, seed=args.seed)  # this process's shard
    loader = DataLoader(examples, batch_size=args.batch_size, sampler=sampler, collate_fn=collator, drop_last=True)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task_type)

    state = estimate_gora(model, lora_config, loader, gora_config=GoraConfig(num_steps=args.num_steps, seed=args.seed))
    if rank == 0:
        state.save(args.output)
        logger.info("%s\nsaved GoRA state to %s (%d steps over %d processes)", state.summary(), args.output,
                    state.num_steps, world)

    peft_model = apply_gora(model, lora_config, state)
    identical = same_on_every_process(adapter_checksum(peft_model))
    logger.info("adapters identical on all %d processes after apply_gora: %s", world, identical)

    train(peft_model, loader, device, args.train_steps)  # the DDP wrapper is gone before the teardown below
    identical_after = same_on_every_process(adapter_checksum(peft_model))
    logger.info("adapters identical on all %d processes after training: %s", world, identical_after)
    dist.barrier()  # leave together
    dist.destroy_process_group()
    if not (identical and identical_after):
        raise SystemExit(f"rank {rank}: adapters differ between processes")


if __name__ == "__main__":
    main()
