"""The fixed part of GoRA's estimation on the host, before and after its speed-ups, timed side by side.

After the N forward+backward passes, ``estimate_gora`` scores every layer, draws A_max, solves for C and records
package versions: a cost that does not shrink with N. At the Llama-3.1-8B shape (128 target layers) the H100 run
measured ~0.4 s above the floor at N = 4. This script times each host-side step of that fixed part twice, the way
the library did it before (the code as of commit 2739e77, written out here) and the way it does it now,
alternated in one process, on a model shape's target layers:

- draw A_max (in × r_max per layer, CPU generators): one layer after another, vs ``initialization.draw_pool``;
  on an accelerator the full estimator now also draws while the passes run, which hides this step entirely;
- score mean|W ⊙ Ḡ|: a product temporary, then ``abs``, vs ``importance.score_consuming_`` in Ḡ's memory;
  timed on one transformer block and scaled to all blocks (full-size fp32 Ḡ of every layer would not fit here);
- solve C = P (A Aᵀ)⁻¹ in float64: ``cholesky_solve`` with ``out`` right-hand sides vs ``initialization.solve_c``;
- package versions: ``importlib.metadata`` lookups on every call vs once per process.

    python benchmarks/estimation_cost/fixed_cost.py --out benchmarks/results/cpu/fixed-cost

Writes ``results.json`` and ``table.md`` into ``--out``; prints the table. The speed-ups hold on any device whose
host does these steps (all of them run on the CPU, except scoring, which runs where the sums are).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # measure this checkout's gora

import models  # noqa: E402
from env import alternated_best, environment, machine_line, markdown_table, write_results  # noqa: E402

from gora import versions  # noqa: E402
from gora.importance import score_consuming_  # noqa: E402
from gora.initialization import draw_a, draw_pool, solve_c  # noqa: E402


def solve_c_before(projected_grad: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``solve_c`` as of commit 2739e77: a Cholesky solve with the projection's ``out`` rows as right-hand sides."""
    gram64 = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram64)
    if int(info) == 0:
        solution = torch.cholesky_solve(projected_grad.double().t(), factor)
    else:
        solution = torch.linalg.lstsq(gram64, projected_grad.double().t()).solution
    return solution.t().float().contiguous()


def target_layers(shape: models.Shape) -> list[tuple[str, int, int]]:
    """(name, out, in) of every target layer of the shape."""
    names = models.LLAMA_TARGETS
    return [(f"model.layers.{block}.self_attn.{name}", out, inp)
            for block in range(shape.layers) for name, (out, inp) in zip(names, models.block_shapes(shape))]


def measure(size: str, reference_rank: int, reps: int) -> list[dict]:
    shape = models.SHAPES[size]
    layers = target_layers(shape)
    r_max = 4 * reference_rank  # GoraConfig's default rank range [r/2, 4r]
    ranks = [reference_rank // 2 + i % (r_max - reference_rank // 2 + 1) for i in range(len(layers))]
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, float]] = {}

    def time_pair(step: str, before, after, setup=None, scale: float = 1.0) -> None:
        times = alternated_best({"before": before, "after": after}, reps, setup)
        results[step] = {which: seconds * scale for which, seconds in times.items()}

    time_pair("draw A_max",
              lambda: [draw_a(0, name, r_max, inp) for name, _, inp in layers],
              lambda: _draw_on_pool(layers, r_max))
    a_max = {name: draw_a(0, name, r_max, inp) for name, _, inp in layers}
    projected = {name: torch.randn(out, r_max, generator=generator) for name, out, _ in layers}
    factors = [(projected[name][:, :rank], a_max[name][:rank].contiguous())
               for (name, _, _), rank in zip(layers, ranks)]
    time_pair("solve C (float64)",
              lambda: [solve_c_before(p, a @ a.t()) for p, a in factors],
              lambda: [solve_c(p, a @ a.t()) for p, a in factors])
    block = models.block_shapes(shape)
    weights = [torch.randn(s, generator=generator).bfloat16() for s in block]
    sums = [torch.randn(s, generator=generator) * 1e-3 for s in block]
    work = [torch.empty(s) for s in block]  # the mean gradient the library divides in place, then scores

    def fresh() -> None:
        for w, s in zip(work, sums):
            w.copy_(s)

    time_pair("score mean abs(W ⊙ Ḡ)",
              lambda: [(w.float() * g.float()).abs().mean() for w, g in zip(weights, work)],
              lambda: [score_consuming_("mean_abs", w, g) for w, g in zip(weights, work)],
              setup=fresh, scale=shape.layers)
    time_pair("package versions", versions._versions.__wrapped__, versions.package_versions)
    records = [{"size": size, "step": step, "layers": len(layers), "before_s": t["before"], "after_s": t["after"],
                "speedup": t["before"] / t["after"]} for step, t in results.items()]
    total = {which: sum(t[which] for t in results.values()) for which in ("before", "after")}
    records.append({"size": size, "step": "total", "layers": len(layers), "before_s": total["before"],
                    "after_s": total["after"], "speedup": total["before"] / total["after"]})
    return records


def _draw_on_pool(layers: list[tuple[str, int, int]], r_max: int) -> list[torch.Tensor]:
    with draw_pool(len(layers)) as pool:
        futures = [pool.submit(draw_a, 0, name, r_max, inp) for name, _, inp in layers]
    return [f.result() for f in futures]


def table(records: list[dict]) -> str:
    return markdown_table([
        ("size", lambda r: r["size"]), ("step", lambda r: r["step"]), ("layers", lambda r: r["layers"]),
        ("before ms", lambda r: f"{1e3 * r['before_s']:.1f}"), ("after ms", lambda r: f"{1e3 * r['after_s']:.1f}"),
        ("speedup", lambda r: f"**{r['speedup']:.2f}×**")], records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="llama-3.2-1b,llama-3.1-8b")
    parser.add_argument("--r", type=int, default=8, help="LoRA's reference rank (GoRA's ranks span r/2 .. 4r)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = [record for size in args.sizes.split(",") for record in measure(size, args.r, args.reps)]
    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    text = (f"## Host-side fixed cost of estimation, before and after (r = {args.r}, ranks {args.r // 2}..{4 * args.r})"
            f"\n\n{machine_line(env)}\n\nBest of {args.reps} "
            f"alternated runs per step; scoring timed on one block and multiplied by the number of blocks.\n\n"
            f"{table(records)}\n")
    write_results(args.out, env, records, text)


if __name__ == "__main__":
    main()
