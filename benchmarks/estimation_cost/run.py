"""Estimation cost of GoRA vs the floor, PEFT LoRA, PEFT LoRA-GA and an official-style estimator.

    python benchmarks/estimation_cost/run.py --device cpu --out benchmarks/results/cpu/estimation-cost
    python benchmarks/estimation_cost/run.py --device cuda --out benchmarks/results/h100/estimation-cost

Every configuration (section, method, size, N) runs in its own subprocess (``worker.py``), because peak memory is
per process; a failing or timed-out configuration is recorded with its error and the others go on. Writes
``results.json`` (after every configuration), ``table.md`` and ``cost_vs_size.png`` into ``--out``. Reads nothing
outside the repository and the installed packages: models are random ``LlamaConfig``/``BertConfig`` shapes, except
the real MiniLM and Rotten Tomatoes batches when their packages are installed (CPU defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))  # measure this checkout's gora

import models  # noqa: E402
import report  # noqa: E402
from env import environment  # noqa: E402

ESTIMATORS = ["gora", "gora_sketch", "loraga", "official"]
DEFAULTS = {
    "cpu": {"dtype": "float32", "sizes": ["llama-tiny", "llama-160m", "tinyllama-1.1b"],
            "scale_methods": ["lora", "gora", "gora_sketch", "loraga", "official"],
            "time_methods": ["gora", "gora_sketch", "gora_ckpt", "loraga", "official"],
            "steps": 2, "batch": 2, "seq": 64, "reps": 1,
            "time": {"size": "minilm", "steps": 4, "batch": 16, "seq": 64, "reps": 3},
            "n_sweep": [8], "n_sweep_size": "llama-160m", "throughput_sizes": ["minilm"], "timeout": 900, "threads": 1,
            "ranks_sketch_dims": [32], "sections": "time,throughput,ranks,scale,nsweep", "max_minutes": 40,
            "order": ["time", "throughput", "ranks", "scale", "nsweep"]},
    "cuda": {"dtype": "bfloat16", "sizes": ["llama-3.2-1b", "llama-3.1-8b"],
             "scale_methods": ["lora", "gora", "gora_offload", "gora_sketch", "loraga", "official"],
             "time_methods": ["gora", "gora_sketch", "gora_ckpt", "gora_offload", "loraga", "official"],
             "steps": 4, "batch": 2, "seq": 512, "reps": 6,
             "time": {"size": "minilm", "steps": 32, "batch": 32, "seq": 128, "reps": 15},
             "n_sweep": [12], "n_sweep_size": "llama-3.2-1b", "n_sweep_methods": ["gora", "official"],
             "throughput_sizes": ["minilm", "llama-3.2-1b"], "timeout": 300, "threads": 0,
             "ranks_sketch_dims": [16, 32, 64], "sections": "time,throughput,scale,nsweep", "max_minutes": 7.5,
             "order": ["scale", "time", "throughput", "nsweep", "ranks"]},
}


SMOKE = {"sizes": ["llama-tiny"], "steps": 2, "reps": 1, "ranks_steps": 2, "ranks_sketch_dims": [32],
         "time": {"size": "minilm", "steps": 2, "batch": 4, "seq": 32, "reps": 1}, "n_sweep": [3],
         "throughput_sizes": ["minilm"], "timeout": 300}
for _device in DEFAULTS.values():
    _device.setdefault("ranks_steps", 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, cost_vs_size.png")
    parser.add_argument("--sizes", help=f"comma-separated Llama shapes for the scale section; known: "
                                         f"{', '.join(s for s in models.SHAPES if s != 'minilm')}")
    parser.add_argument("--sections", help="any of time, throughput, ranks, scale, nsweep (default: all on CPU; "
                                           "all but ranks on CUDA, which needs MiniLM and Rotten Tomatoes installed)")
    parser.add_argument("--methods", help="methods of the scale and time sections (default: all for the device; "
                                          "each section keeps only those it knows)")
    parser.add_argument("--steps", type=int, help="N for the scale section")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--reps", type=int, help="[floor, method] rounds after the memory run (scale section; "
                                                  "default 1 on CPU, 6 on CUDA)")
    parser.add_argument("--time-reps", type=int, help="rounds of the time section, in alternating order (default 3 on "
                                                       "CPU, 15 on CUDA; at least 6 for a 95 %% interval of the median "
                                                       "ratio)")
    parser.add_argument("--dtype", help="float32, bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--timeout", type=int, help="seconds per configuration")
    parser.add_argument("--threads", type=int, help="torch threads per worker (0: torch's default; CPU default 1: "
                                                     "on a shared 2-core machine 2 threads were 3-5x slower and erratic)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and N, one round: checks the script in minutes")
    parser.add_argument("--max-minutes", type=float, help="configurations not started by then are recorded as skipped "
                                                          "(default 40 on CPU, 7.5 on CUDA)")
    parser.add_argument("--append", action="store_true", help="keep the records already in OUT/results.json")
    parser.add_argument("--report-only", action="store_true", help="only remake table.md and the plot")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[dict]:
    d = DEFAULTS[args.device] if not args.smoke else {**DEFAULTS[args.device], **SMOKE}
    dtype = args.dtype or d["dtype"]
    sections = set((args.sections or d["sections"]).split(","))
    threads = d["threads"] if args.threads is None else args.threads
    base = {"device": args.device, "dtype": dtype, "threads": threads}
    t = d["time"]
    minilm_data = "rotten_tomatoes" if args.device == "cpu" else "random"
    asked = args.methods.split(",") if args.methods else None  # each section keeps the asked methods it knows

    def methods(known: list[str]) -> list[str]:
        return [m for m in known if asked is None or m in asked]

    by_section: dict[str, list[dict]] = {}
    by_section["time"] = [{**base, "section": "time", "method": method, "size": t["size"], "steps": t["steps"],
                           "batch": t["batch"], "seq": t["seq"], "reps": args.time_reps or t["reps"],
                           "data": minilm_data}
                          for method in methods(d["time_methods"])]
    by_section["throughput"] = []
    for size in d["throughput_sizes"]:
        llama = size != "minilm"
        by_section["throughput"].append(
            {**base, "section": "throughput", "method": "gora_vs_lora", "size": size, "steps": 8,
             "gora_steps": 4 if llama else 8, "train_steps": 4 if llama else 8,
             "batch": args.batch or d["batch"] if llama else t["batch"],
             "seq": args.seq or d["seq"] if llama else t["seq"], "reps": 3, "data": "random" if llama else minilm_data})
    by_section["ranks"] = [{**base, "section": "ranks", "method": "full_vs_sketch", "size": "minilm",
                            "steps": d["ranks_steps"], "batch": 16, "seq": 64, "data": "rotten_tomatoes",
                            "sketch_dims": d["ranks_sketch_dims"], "dtype": "float32"}]
    sizes = args.sizes.split(",") if args.sizes else d["sizes"]
    scale_methods = methods(d["scale_methods"])
    steps, batch, seq, reps = (args.steps or d["steps"], args.batch or d["batch"], args.seq or d["seq"],
                               d["reps"] if args.reps is None else args.reps)
    by_section["scale"] = [{**base, "section": "scale", "method": method, "size": size, "steps": steps, "batch": batch,
                            "seq": seq, "reps": reps, "data": "random"} for size in sizes for method in scale_methods]
    sweep_size = d["n_sweep_size"] if d["n_sweep_size"] in sizes else sizes[0]
    by_section["nsweep"] = [{**base, "section": "scale", "method": method, "size": sweep_size, "steps": n, "batch": batch,
                             "seq": seq, "reps": 0, "data": "random"}
                            for n in d["n_sweep"] for method in d.get("n_sweep_methods", ["gora", "gora_sketch", "official"])]
    return [spec for section in d["order"] if section in sections for spec in by_section[section]]


def predicted_host_bytes(spec: dict) -> int:
    """A generous host-memory estimate for a CPU configuration (to skip, not crash, what cannot fit)."""
    params, targets = models.parameter_count(models.SHAPES[spec["size"]])
    width = 2 if spec["dtype"] in ("bfloat16", "float16") else 4
    extra = {"gora": 4 * targets, "floor": width * targets, "loraga": width * targets,
             "official": width * targets, "gora_vs_lora": params * width}  # official: its sums, parameter dtype
    return int(params * width * 1.15 + extra.get(spec["method"], 0) + 1.5 * 2**30)


def run_one(spec: dict, timeout: int) -> dict:
    if spec["device"] == "cpu":
        need, available = predicted_host_bytes(spec), models.host_available()
        if available is not None and need > 0.9 * available:
            return {**spec, "status": "skipped", "error": f"predicted {need / 2**30:.1f} GiB > 90% of the "
                                                          f"{available / 2**30:.1f} GiB available"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(HERE / "worker.py"), json.dumps(spec), str(out)],
                                  capture_output=True, text=True, timeout=timeout, cwd=str(HERE))
        except subprocess.TimeoutExpired:
            return {**spec, "status": "error", "error": f"timed out after {timeout} s"}
        wall = time.perf_counter() - start
        if out.is_file():
            return {**json.loads(out.read_text()), "wall_s": wall}
        return {**spec, "status": "error", "wall_s": wall,
                "error": f"worker exited {proc.returncode} without a record: {proc.stderr[-1500:]}"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    if args.report_only:
        report.write(out, json.loads(path.read_text()))
        return
    timeout = args.timeout or DEFAULTS[args.device]["timeout"]
    previous = json.loads(path.read_text()) if args.append and path.is_file() else {"records": []}
    data = {"environment": environment(args.device), "records": list(previous.get("records", []))}
    earlier = previous.get("earlier_runs", []) + ([previous["environment"]] if "environment" in previous else [])
    if earlier:
        data["earlier_runs"] = earlier  # the environments of the runs whose records were kept (--append)
    started = time.perf_counter()
    specs = plan(args)
    max_minutes = DEFAULTS[args.device]["max_minutes"] if args.max_minutes is None else args.max_minutes
    for index, spec in enumerate(specs, 1):
        print(f"[{index}/{len(specs)}] {spec['section']} {spec['method']} {spec['size']} N={spec['steps']} ...",
              end=" ", flush=True)
        elapsed = time.perf_counter() - started
        if elapsed > 60 * max_minutes:
            record = {**spec, "status": "skipped", "error": f"time budget: {elapsed / 60:.1f} min > --max-minutes "
                                                            f"{max_minutes}"}
        else:
            record = run_one(spec, min(timeout, max(60, int(60 * max_minutes - elapsed) + 60)))
        data["records"].append(record)
        path.write_text(json.dumps(data, indent=1))
        print(f"{record['status']} ({record.get('wall_s', 0):.0f} s)" +
              (f": {record['error'][:200]}" if record["status"] != "ok" else ""), flush=True)
    data["environment"]["total_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        data["environment"]["load_average_end"] = os.getloadavg()
    path.write_text(json.dumps(data, indent=1))
    print(report.write(out, data))


if __name__ == "__main__":
    main()
