"""Host time per layer of GoRA's estimation loop, where the passes themselves cost almost nothing.

A small model on a GPU is bound by the host: every operation a hook issues costs host time (Python, the
dispatcher, a launch) in every step. This script
makes that cost visible on the CPU with an MLP of tiny ``Linear`` layers, whose passes take microseconds, and
times in one process, alternated, round by round:

- ``floor``: N plain forward+backward passes with gradients on the weights, ``grad = None`` after each;
- ``drop hook``: the same with a post-accumulate hook per weight that drops its gradient;
- ``GoRA, one add per hook``: ``run_estimation`` (the library's loop, full estimator, sums on the CPU) with a
  batch budget of 0: every hook adds its gradient into its fp32 sum at once (the code before batching);
- ``GoRA, batched adds``: the same with the CPU default ``CPU_BATCH_ADD_BYTES``: small gradients are held and
  added with one ``torch._foreach_add_``;
- ``GoRA, accelerator budget``: the same with ``BATCH_ADD_BYTES``, the budget for sums on an accelerator.

A second table shows the other side on the CPU: a held gradient leaves the cache before its add. On MiniLM's
target shapes (37 layers, 0.6-2.4 MB fp32 gradients made by the same GEMM as backward's, 1024 tokens) one step's
gradients are made and added at once, or held and added with ``torch._foreach_add_`` under a budget of 64 KiB
(the CPU default), 16 MiB (the accelerator default) or all of them; ms per step more than adding at once.

    python benchmarks/estimation_cost/host_overhead.py --out benchmarks/results/cpu/host-overhead

Reports µs per step and per layer over the floor (median over rounds, with the distribution-free 95 % interval
of the per-round medians where there are 6 rounds or more). Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import environment, machine_line, markdown_table, median_interval, write_results  # noqa: E402

from gora import GoraConfig, accumulate  # noqa: E402
from gora.estimation import run_estimation  # noqa: E402
from gora.targets import resolve_targets  # noqa: E402
from peft import LoraConfig  # noqa: E402


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).pow(2).mean()


def measure(layers: int, width: int, batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for param in model.parameters():
        param.requires_grad_(False)
    batches = [torch.randn(batch, width) for _ in range(steps)]
    targets, _ = resolve_targets(model, LoraConfig(r=8, target_modules=[str(i) for i in range(layers)]))
    weights = [t.weight for t in targets]
    config = GoraConfig(num_steps=steps, show_progress=False)

    def passes(drop: bool) -> float:
        for weight in weights:
            weight.requires_grad_(True)
        handles = [w.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for w in weights] \
            if drop else []
        start = time.perf_counter()
        for x in batches:
            _loss(model, x).backward()
            for weight in weights:
                weight.grad = None
        seconds = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        for weight in weights:
            weight.requires_grad_(False)
        return seconds

    def gora(batch_bytes: int) -> float:
        saved, accumulate.CPU_BATCH_ADD_BYTES = accumulate.CPU_BATCH_ADD_BYTES, batch_bytes
        try:
            run = run_estimation(model, targets, iter(batches), config, _loss, None, torch.device("cpu"))
        finally:
            accumulate.CPU_BATCH_ADD_BYTES = saved
        return run.seconds

    default_bytes = accumulate.CPU_BATCH_ADD_BYTES
    variants = {"floor": lambda: passes(False), "drop_hook": lambda: passes(True),
                "gora_per_hook": lambda: gora(0), "gora_batched": lambda: gora(default_bytes),
                "gora_accelerator_budget": lambda: gora(accumulate.BATCH_ADD_BYTES)}
    for fn in variants.values():
        fn()  # warm-up: sums, workspaces, first-call paths
    seconds = {name: [] for name in variants}
    order = list(variants)
    for index in range(rounds):  # alternate the order: a drift in machine speed cancels
        for name in order if index % 2 == 0 else order[::-1]:
            seconds[name].append(variants[name]())
    record = {"layers": layers, "width": width, "batch": batch, "steps": steps, "rounds": rounds,
              "batch_add_bytes": default_bytes, "seconds": seconds}
    floor = seconds["floor"]
    for name in variants:
        per_step = [s / steps * 1e6 for s in seconds[name]]
        over = [(s - f) / steps / layers * 1e6 for s, f in zip(seconds[name], floor)]  # same round's floor
        record[f"{name}_us_per_step"] = statistics.median(per_step)
        record[f"{name}_us_per_layer_over_floor"] = statistics.median(over)
        record[f"{name}_us_per_layer_interval"] = median_interval(over)
    record["per_hook_over_batched"] = (statistics.median(seconds["gora_per_hook"])
                                       / statistics.median(seconds["gora_batched"]))
    return record


MINILM_SHAPES = [(384, 384)] * 24 + [(1536, 384), (384, 1536)] * 6 + [(384, 384)]
"""(out, in) of MiniLM's 37 target layers: q, k, v, attention output of 6 blocks, the two MLP layers, the pooler."""


def measure_held(rounds: int, tokens: int = 1024) -> dict:
    """ms per step that holding MiniLM-sized gradients for a batched add costs over adding each at once (CPU)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(tokens, i, generator=generator) for _, i in MINILM_SHAPES]
    grad_outs = [torch.randn(tokens, o, generator=generator) for o, _ in MINILM_SHAPES]
    sums = [torch.zeros(o, i) for o, i in MINILM_SHAPES]

    # the accumulator's own batching (``_add_batched`` / ``_flush``), outside backward: only the adds' cache use differs
    batcher = accumulate.GradientAccumulator(nn.Module(), [], torch.device("cpu"))

    def step(budget: int) -> float:
        batcher.batch_add_bytes = budget  # 0: every gradient is added at once
        start = time.perf_counter()
        for x, grad_out, total in zip(inputs, grad_outs, sums):
            batcher._add_batched(total, grad_out.t() @ x)  # the weight gradient, as backward makes it
        batcher._flush()
        return time.perf_counter() - start

    budgets = {"at_once": 0, "cpu_budget": accumulate.CPU_BATCH_ADD_BYTES, "accelerator_budget":
               accumulate.BATCH_ADD_BYTES, "all_held": 1 << 62}
    for budget in budgets.values():
        step(budget)
    seconds = {name: [] for name in budgets}
    order = list(budgets)
    for index in range(rounds):
        for name in order if index % 2 == 0 else order[::-1]:
            seconds[name].append(step(budgets[name]))
    record = {"shapes": "minilm", "tokens": tokens, "rounds": rounds, "budgets": budgets, "seconds": seconds,
              "at_once_ms_per_step": statistics.median(seconds["at_once"]) * 1e3}
    for name in order[1:]:
        extra = [(b - a) * 1e3 for a, b in zip(seconds["at_once"], seconds[name])]  # same round
        record[f"{name}_extra_ms"] = statistics.median(extra)
        record[f"{name}_extra_ms_interval"] = median_interval(extra)
    return record


def held_table(record: dict) -> str:
    def cell(name: str) -> str:
        interval = record[f"{name}_extra_ms_interval"]
        spread = f" ({interval[0]:+.1f} to {interval[1]:+.1f})" if interval else ""
        return f"{record[f'{name}_extra_ms']:+.1f}{spread}"

    return markdown_table([
        ("shapes, tokens", lambda r: f"MiniLM (37 layers), {r['tokens']}"),
        ("make + add at once, ms/step", lambda r: f"{r['at_once_ms_per_step']:.1f}"),
        ("held, CPU budget (64 KiB)", lambda r: cell("cpu_budget")),
        ("held, accelerator budget (16 MiB)", lambda r: cell("accelerator_budget")),
        ("all held to the end", lambda r: cell("all_held"))], [record])


def _cell(record: dict, name: str) -> str:
    interval = record[f"{name}_us_per_layer_interval"]
    spread = f" ({interval[0]:.1f}–{interval[1]:.1f})" if interval else ""
    return f"{record[f'{name}_us_per_step']:.0f} µs/step; {record[f'{name}_us_per_layer_over_floor']:.1f}{spread}"


def table(records: list[dict]) -> str:
    return markdown_table([
        ("layers × width, batch, N", lambda r: f"{r['layers']} × {r['width']}, {r['batch']}, {r['steps']}"),
        ("floor", lambda r: f"{r['floor_us_per_step']:.0f} µs/step"),
        ("drop hook: µs/layer over floor", lambda r: _cell(r, "drop_hook")),
        ("GoRA, one add per hook", lambda r: _cell(r, "gora_per_hook")),
        ("GoRA, batched adds (CPU budget)", lambda r: _cell(r, "gora_batched")),
        ("GoRA, accelerator budget", lambda r: _cell(r, "gora_accelerator_budget")),
        ("per hook ÷ batched (time)", lambda r: f"**{r['per_hook_over_batched']:.2f}×**")], records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", default="16,64", help="comma-separated layer counts")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--held-rounds", type=int, default=40, help="rounds of the held-gradients table (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [measure(int(n), args.width, args.batch, args.steps, args.rounds) for n in args.layers.split(",")]
    held = measure_held(args.held_rounds) if args.held_rounds else None
    env = {**environment(), "torch_threads": args.threads}
    text = (f"## Host time per layer of the estimation loop (tiny MLP, CPU)\n\n{machine_line(env)}\n\n"
            f"Median over {args.rounds} alternated rounds; cells: µs per step, then µs per layer over the same "
            "round's floor (95 % interval).\n\n"
            f"{table(records)}\n")
    if held is not None:
        records.append(held)
        text += (f"\n### Holding gradients for a batched add on the CPU (median over {args.held_rounds} alternated "
                 "rounds: ms per step more than adding each gradient at once, 95 % interval)\n\n"
                 f"{held_table(held)}\n")
    write_results(args.out, env, records, text)


if __name__ == "__main__":
    main()
