"""Run grid cells as parallel processes sharing one GPU, in the grid's two phases.

    python benchmarks/grid/parallel_grid.py benchmarks/grid/h100_followup.json --out runs/h100-followup --jobs 16

Phase 1 trains every learning rate of a (study, method, task) on the first seed; as soon as all of them are done,
the rate with the best *validation* score is chosen with the grid's own rule (``gora.bench.grid.select_lr``) and
phase 2 trains the other seeds at that rate. Every run is one ``python -m gora.bench grid`` process with one
method, task, seed and rate in its own folder (``<out>/<study>/<method>/<task>/lr<lr>-s<seed>/``), so a stopped
plan resumes: finished folders are skipped by the grid itself. MiniLM steps are launch-bound, so a dozen processes
keep one H100 busy where one process would leave it mostly idle.

The plan (JSON) names the shared arguments, per-task arguments and the studies::

    {"common": ["--max-val", "1000", ...],
     "task_args": {"epistemic": ["--epochs", "4"], "*": ["--max-train", "6400"]},
     "studies": [{"name": "adalora", "methods": ["adalora"], "tasks": [...], "seeds": [0, 1, 2],
                  "lrs": {"adalora": [2e-3, 5e-3, 1e-2]}, "args": []}, ...]}

At the end, each study's chosen runs go to ``<out>/merged/<study>/results.json`` (every phase-1 run to its
``lr_search.json``), ready for ``python -m gora.bench report``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from gora.bench.grid import CONFIG_FILE, LR_SEARCH_FILE, RESULTS_FILE, select_lr
from gora.bench.records import load_records, save_records


@dataclass(frozen=True)
class Run:
    study: str
    method: str
    task: str
    lr: float
    seed: int

    def folder(self, out: Path) -> Path:
        return out / self.study / self.method / self.task / f"lr{self.lr:g}-s{self.seed}"


@dataclass
class Group:
    """The runs of one (study, method, task): the learning-rate search, then the other seeds."""

    study: dict
    method: str
    task: str
    search: list[Run] = field(default_factory=list)
    chosen: float | None = None


def command(run: Run, plan: dict, study: dict, out: Path) -> list[str]:
    task_args = plan.get("task_args", {})
    return [sys.executable, "-m", "gora.bench", "grid", "--protocol", "1", "--methods", run.method,
            "--tasks", run.task, "--seeds", str(run.seed), "--lr", f"{run.method}={run.lr!r}", "--no-report", "--no-progress",
            *plan.get("common", []), *task_args.get(run.task, task_args.get("*", [])), *study.get("args", []),
            "--out-dir", str(run.folder(out))]


def record_of(run: Run, out: Path) -> dict | None:
    path = run.folder(out) / RESULTS_FILE
    records = load_records(path) if path.is_file() else []
    return records[0] if records else None


def execute(run: Run, plan: dict, study: dict, out: Path, deadline: float) -> bool:
    if record_of(run, out) is not None:
        return True
    folder = run.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    if left <= 5:
        return False
    with open(folder / "log.txt", "w") as log:
        try:
            subprocess.run(command(run, plan, study, out), stdout=log, stderr=subprocess.STDOUT, timeout=left,
                           check=False)
        except subprocess.TimeoutExpired:
            return False
    return record_of(run, out) is not None


def groups_of(plan: dict) -> list[Group]:
    groups = []
    for study in plan["studies"]:
        for method in study["methods"]:
            for task in study["tasks"]:
                group = Group(study, method, task)
                lrs = study["lrs"][method]
                # One rate: nothing to choose, so every seed runs in the first phase.
                seeds = study["seeds"] if len(lrs) == 1 else study["seeds"][:1]
                group.search = [Run(study["name"], method, task, float(lr), seed) for lr in lrs for seed in seeds]
                groups.append(group)
    return groups


def later_runs(group: Group, out: Path) -> list[Run]:
    """Choose the rate on validation once the search is complete; the other seeds' runs at that rate."""
    first = [record_of(run, out) for run in group.search if run.seed == group.study["seeds"][0]]
    if any(r is None for r in first):
        return []
    group.chosen = select_lr(first)["lr"]
    done = {run.seed for run in group.search}
    return [Run(group.study["name"], group.method, group.task, group.chosen, seed)
            for seed in group.study["seeds"] if seed not in done]


def merge_plan(plan: dict, out: Path, groups: list[Group] | None = None) -> None:
    """Write ``merged/<study>/`` from the finished runs (choosing each group's rate if not yet chosen)."""
    groups = groups if groups is not None else groups_of(plan)
    for group in groups:
        if group.chosen is None:
            later_runs(group, out)
    for study in plan["studies"]:
        merge_study(study["name"], [g for g in groups if g.study["name"] == study["name"]], out)


def run_plan(plan: dict, out: Path, jobs: int, budget: float) -> None:
    """Keep ``jobs`` runs in flight; a group's later seeds jump the queue once its search is done."""
    deadline = time.monotonic() + budget
    groups = groups_of(plan)
    queue = deque((g, run) for g in groups for run in g.search)
    searching = {id(g): len(g.search) for g in groups}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}
        while queue or running:
            while queue and len(running) < jobs:
                group, run = queue.popleft()
                running[pool.submit(execute, run, plan, group.study, out, deadline)] = (group, run)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                group, run = running.pop(future)
                elapsed = time.monotonic() - deadline + budget
                print(f"{'done' if future.result() else 'FAILED'}: {run} ({elapsed:.0f} s)", flush=True)
                if run in group.search:
                    searching[id(group)] -= 1
                    if searching[id(group)] == 0:
                        queue.extendleft((group, later) for later in reversed(later_runs(group, out)))
    merge_plan(plan, out, groups)


def merge_study(name: str, groups: list[Group], out: Path) -> None:
    results, searches, configs = [], [], {}
    for group in groups:
        for run in group.search:
            path = run.folder(out) / CONFIG_FILE
            if path.is_file():
                configs[str(run.folder(out))] = json.loads(path.read_text())
        first_seed = group.study["seeds"][0]
        search = [r for r in (record_of(run, out) for run in group.search if run.seed == first_seed) if r]
        if len(group.study["lrs"][group.method]) > 1:
            searches += search
        if group.chosen is None:
            continue
        for seed in group.study["seeds"]:
            record = record_of(Run(name, group.method, group.task, group.chosen, seed), out)
            path = Run(name, group.method, group.task, group.chosen, seed).folder(out) / CONFIG_FILE
            if record is not None:
                results.append(record)
                configs[str(path.parent)] = json.loads(path.read_text())
    target = out / "merged" / name
    target.mkdir(parents=True, exist_ok=True)
    save_records(target / RESULTS_FILE, results)
    save_records(target / LR_SEARCH_FILE, searches)
    (target / "grid_configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    print(f"{name}: {len(results)} results, {len(searches)} search runs -> {target}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path, help="plan JSON (see the module docstring)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the run folders and merged/")
    parser.add_argument("--jobs", type=int, default=12, help="processes at once")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; later runs are not started")
    parser.add_argument("--merge-only", action="store_true", help="only rewrite merged/ from finished runs")
    args = parser.parse_args()
    plan = json.loads(args.plan.read_text())
    if args.merge_only:
        merge_plan(plan, args.out)
    else:
        run_plan(plan, args.out, args.jobs, args.budget)


if __name__ == "__main__":
    main()
