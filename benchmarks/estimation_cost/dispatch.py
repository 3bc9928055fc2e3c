"""Tensor operations that GoRA's estimation adds to each forward+backward step, counted, not timed.

On a GPU every non-view operation is a kernel launch, and a small model's step is bound by launches (MiniLM on an
H100: ~12 ms per step, mostly launch overhead). So the operations an estimator adds per layer and step are what
its time overhead is made of there. They are counted on any device with a ``TorchDispatchMode`` (every aten call
as the device sees it): the count does not depend on the machine's load, so it can be compared across commits.

    python benchmarks/estimation_cost/dispatch.py --out benchmarks/results/cpu/dispatch

Counts the aten calls of ``gora.estimate_gora`` with N and with 2N batches, and of N and 2N plain forward+backward
passes with gradients on the same weights: the difference per extra step is what each step adds (hooks, NaN/Inf
flags); what is left is the fixed cost (scoring, allocation, initialisation). The sums use the accelerator's
batch budget for the adds (``gora.accumulate.BATCH_ADD_BYTES``), not the CPU's smaller one, so that the count is what
a GPU step issues. Writes ``results.json`` and ``table.md``; prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from env import environment, markdown_table, write_results  # noqa: E402

from gora import GoraConfig, accumulate, estimate_gora  # noqa: E402
from gora.targets import resolve_targets  # noqa: E402

VIEWS = {"view", "t", "transpose", "detach", "alias", "slice", "select", "_reshape_alias", "as_strided", "expand",
         "unsqueeze", "squeeze", "reshape", "_unsafe_view", "lift_fresh"}
"""aten ops that launch no kernel (metadata only)."""


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def floor_ops(model, targets, batches) -> Counter:
    for param in model.parameters():
        param.requires_grad_(False)
    for target in targets:
        target.weight.requires_grad_(True)
    with CountOps() as counter:
        for batch in batches:
            model(**batch).loss.backward()
            for target in targets:
                target.weight.grad = None
    for target in targets:
        target.weight.requires_grad_(False)
    return counter.ops


def gora_ops(model, lora_config: LoraConfig, batches, config: GoraConfig) -> Counter:
    with CountOps() as counter:
        estimate_gora(model, lora_config, batches, gora_config=config)
    return counter.ops


def launches(ops: Counter) -> int:
    return sum(n for op, n in ops.items() if op not in VIEWS)


def measure(size: str, dtype: torch.dtype, estimator: str, steps: int) -> dict:
    model, target_names, weights = models.build_model(size, torch.device("cpu"), dtype, pretrained=False)
    lora_config = LoraConfig(r=8, target_modules=target_names)
    targets, _ = resolve_targets(model, lora_config)
    batches = models.random_batches(size, 2 * steps, 2, 16, torch.device("cpu"))
    extra = {"importance": "frobenius"} if estimator == "sketch" else {}
    counts, floors = {}, {}
    for n in (steps, 2 * steps):  # estimate_gora's calls beyond those of the same plain passes, per op
        floors[n] = floor_ops(model, targets, batches[:n])
        counts[n] = gora_ops(model, lora_config, batches[:n],
                             GoraConfig(num_steps=n, estimator=estimator, show_progress=False, **extra))
        counts[n].subtract(floors[n])
    per_step = Counter(counts[2 * steps])
    per_step.subtract(counts[steps])  # N more steps; the fixed cost cancels
    per_step = {op: n / steps for op, n in per_step.items() if n}
    fixed = {op: n - steps * per_step.get(op, 0) for op, n in counts[steps].items()}
    step_launches = launches(Counter(per_step))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "estimator": estimator, "steps": steps,
            "layers": len(targets), "weights": weights,
            "floor_ops_per_step": sum(floors[steps].values()) / steps,
            "added_ops_per_step": sum(per_step.values()), "added_launches_per_step": step_launches,
            "added_launches_per_layer_step": step_launches / len(targets), "fixed_launches": launches(Counter(fixed)),
            "added_per_step_by_op": per_step, "fixed_by_op": {op: n for op, n in fixed.items() if n}}


def table(records: list[dict]) -> str:
    return markdown_table([
        ("model", lambda r: r["size"]), ("dtype", lambda r: r["dtype"]), ("estimator", lambda r: r["estimator"]),
        ("layers", lambda r: r["layers"]), ("floor ops/step", lambda r: f"{r['floor_ops_per_step']:.0f}"),
        ("added ops/step", lambda r: f"{r['added_ops_per_step']:.1f}"),
        ("added non-view ops/step", lambda r: f"{r['added_launches_per_step']:.1f}"),
        ("per layer and step", lambda r: f"**{r['added_launches_per_layer_step']:.2f}**"),
        ("fixed non-view ops (scoring, allocation, init)", lambda r: f"{r['fixed_launches']:.0f}")], records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="minilm,llama-tiny")
    parser.add_argument("--steps", type=int, default=8, help="N (the first step makes the sums; more steps average)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    accumulate.CPU_BATCH_ADD_BYTES = accumulate.BATCH_ADD_BYTES  # count as on an accelerator (see above)
    records = [measure(size, dtype, estimator, args.steps) for size in args.sizes.split(",")
               for dtype in (torch.float32, torch.bfloat16) for estimator in ("full", "sketch")]
    env = environment()
    text = (f"## aten calls GoRA's estimation adds per step (N = {args.steps}, batch 2×16, random weights, CPU)\n\n"
            f"{env['date']}; torch {env['torch']}; commit {env['commit']}.\n\n{table(records)}\n")
    write_results(args.out, env, records, text)


if __name__ == "__main__":
    main()
