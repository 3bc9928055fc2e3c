"""Host-side cost of CPU gradient sums: torch's mixed-dtype ``add_`` vs ``gora.host_add.host_add_``.

When the fp32 sums live in CPU memory (``GoraConfig(offload=True)`` on a GPU, or a bf16/fp16 model estimated
on the CPU), every step adds each target gradient, in its own dtype, into its fp32 sum on the host. torch's CPU
``add_`` with a bf16/fp16 operand and an fp32 result casts element by element; ``host_add_`` converts row blocks
into a reused fp32 workspace (a vectorised ``copy_``) and adds from there. Both are timed side by side in one
process, on the target-layer shapes of one transformer block of a Llama shape, over a grid of torch thread
counts, and the per-step host time of the whole model is projected from the measured rate.

    python benchmarks/estimation_cost/host_add.py --out benchmarks/results/cpu/host-add

Writes ``results.json`` and ``table.md`` into ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from env import alternated_best, environment, machine_line, markdown_table, write_results  # noqa: E402

from gora.host_add import HOST_ADD_CHUNK, host_add_  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def measure(size: str, dtype: torch.dtype, threads: int, reps: int) -> dict:
    shape = models.SHAPES[size]
    shapes = models.block_shapes(shape)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    totals = [torch.zeros(s) for s in shapes]
    workspace = torch.empty(HOST_ADD_CHUNK)
    torch.set_num_threads(threads)

    def plain() -> None:
        for total, grad in zip(totals, grads):
            total.add_(grad)

    def blocked() -> None:
        for total, grad in zip(totals, grads):
            host_add_(total, grad, 1.0, workspace)

    times = alternated_best({"plain": plain, "host_add_": blocked}, reps)
    params = sum(o * i for o, i in shapes)
    _, target_params = models.parameter_count(shape)
    record = {"size": size, "dtype": str(dtype).removeprefix("torch."), "threads": threads, "reps": reps,
              "block_params": params, "model_target_params": target_params}
    for name, seconds in times.items():
        record[f"{name}_seconds"] = seconds
        record[f"{name}_gparams_per_s"] = params / seconds / 1e9
        record[f"{name}_model_step_seconds"] = seconds * target_params / params
    record["speedup"] = times["plain"] / times["host_add_"]
    return record


def table(records: list[dict]) -> str:
    return markdown_table([
        ("size", lambda r: r["size"]), ("dtype", lambda r: r["dtype"]), ("threads", lambda r: r["threads"]),
        ("add_ Gparam/s", lambda r: f"{r['plain_gparams_per_s']:.2f}"),
        ("host_add_ Gparam/s", lambda r: f"{r['host_add__gparams_per_s']:.2f}"),
        ("speedup", lambda r: f"**{r['speedup']:.2f}×**"),
        ("add_ s/step (model)", lambda r: f"{r['plain_model_step_seconds']:.2f}"),
        ("host_add_ s/step (model)", lambda r: f"{r['host_add__model_step_seconds']:.2f}")], records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="llama-3.1-8b", choices=[k for k, v in models.SHAPES.items()
                                                                   if v.family == "llama"])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--threads", default="", help="comma-separated torch thread counts (default: 1 and all)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    records = [measure(args.size, DTYPES[d], t, args.reps) for d in args.dtypes.split(",") for t in threads]
    env = environment()
    text = (f"## Host-side fp32 sums: `add_` vs `host_add_` ({args.size} q/k/v/o block shapes)\n\n"
            f"{machine_line(env)}\n\nBest of {args.reps} alternated runs; s/step (model) = the time to add every "
            f"target gradient of the whole model once, projected from the block's rate.\n\n{table(records)}\n")
    write_results(args.out, env, records, text)


if __name__ == "__main__":
    main()
