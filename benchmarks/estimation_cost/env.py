"""What every estimation-cost script records and writes: the environment of a run, markdown tables, result files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import models


def environment(device: str = "cpu") -> dict:
    """Date, versions, machine, commit and command line of this run (the GPU's name and memory on ``cuda``)."""
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cpu": models.cpu_model(), "cpu_count": os.cpu_count(), "commit": commit or None,
           "command": " ".join(["python"] + sys.argv)}  # "python", not this machine's interpreter path
    if hasattr(os, "getloadavg"):
        env["load_average"] = os.getloadavg()
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return env


def machine_line(env: dict) -> str:
    """One line naming when, on what and under which load a result was measured (for a table's header)."""
    threads = f", {env['torch_threads']} torch threads" if "torch_threads" in env else ""
    return (f"{env['date']}; torch {env['torch']}; {env['cpu']} ({env['cpu_count']} CPUs{threads}); "
            f"load average {env.get('load_average')}; commit {env['commit']}.")


def best_seconds(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    """The least wall time of ``reps`` calls of ``fn`` after one warm-up call; ``setup`` runs, untimed, before each."""
    best = float("inf")
    for rep in range(reps + 1):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        if rep:  # the first call warms up: pages touched, workspaces allocated
            best = min(best, time.perf_counter() - start)
    return best


def alternated_best(fns: dict[str, Callable[[], object]], reps: int,
                    setup: Callable[[], object] | None = None) -> dict[str, float]:
    """{name: least wall time} over ``reps`` rounds that each time every function once (after a warm-up call), in
    turn, so that all of them see the same machine load; ``setup`` runs, untimed, before every call."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], best_seconds(fn, 1, setup))
    return best


def median_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median of ``values``: the order statistics ``(k, n + 1 - k)``
    for the largest ``k`` whose coverage ``1 - 2 P(Binomial(n, 1/2) < k)`` is still at least ``level``. Assumes only
    independent draws from one distribution (no normality); None when ``n`` is too small for ``level`` (n < 6 at
    95 %)."""
    ordered = sorted(values)
    n, k, tail = len(ordered), 0, 0.0
    while k < n // 2:
        tail += math.comb(n, k) / 2**n  # P(B = k), accumulated into P(B <= k)
        if 1 - 2 * tail < level:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def markdown_table(columns: Iterable[tuple[str, Callable[[dict], object]]], records: Iterable[dict]) -> str:
    """A markdown table with one row per record: ``columns`` pairs a header with the function that renders a cell."""
    columns = list(columns)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell(record)) for _, cell in columns) + " |" for record in records]
    return "\n".join(lines)


def write_results(out: str | Path, env: dict, records: list[dict], text: str) -> None:
    """Write ``results.json`` (environment and records) and ``table.md`` (``text``) into ``out``, and print ``text``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"environment": env, "records": records}, indent=2) + "\n")
    (out / "table.md").write_text(text)
    print(text)
