"""Merge per-process grid folders (``<grid>/<method>/<part>/``) into one published folder and render its report.

    python benchmarks/grid/merge_results.py runs/h100-grid benchmarks/results/h100/grid
    python benchmarks/grid/merge_results.py runs/h100-sweep runs/h100-grid benchmarks/results/h100/rank-sweep \
        --tasks rotten_tomatoes --methods lora gora full        # the sweep reuses the grid's r = 8 cells
    python benchmarks/grid/merge_results.py "runs/h100-followup/merged/gora-gamma0=gora, gamma 0" ... OUT
                                                                # FOLDER=LABEL renames its methods ({method} = old name)

Writes ``results.json`` and ``lr_search.json`` (every record of every part, sorted by task, method, seed),
``grid_configs.json`` (each part's ``grid_config.json``, keyed by its folder) and the table and plots.
A cell found twice is an error: the parts must not overlap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gora.bench.grid import CONFIG_FILE, LR_SEARCH_FILE, RESULTS_FILE
from gora.bench.records import cell_key, load_records, save_records
from gora.bench.report import write_report

CONFIGS_FILE = "grid_configs.json"


def merge(grid_dirs: list[Path], out_dir: Path, tasks=None, methods=None) -> int:
    specs = [str(spec).partition("=") for spec in grid_dirs]  # "FOLDER=LABEL" renames the folder's methods
    grid_dirs = [Path(folder) for folder, _, _ in specs]
    labels = {Path(folder): label for folder, _, label in specs if label}
    parts = sorted(p.parent for d in grid_dirs for p in d.glob(f"**/{RESULTS_FILE}"))
    if not parts:
        raise SystemExit(f"No {RESULTS_FILE} under {', '.join(map(str, grid_dirs))}.")
    keep = lambda r: (not tasks or r["task"] in tasks) and (not methods or r["method"] in methods)  # noqa: E731
    results, lr_runs, configs, seen = [], [], {}, set()
    for part in parts:
        label = next((text for folder, text in labels.items() if folder in (part, *part.parents)), None)
        for record in filter(keep, load_records(part / RESULTS_FILE)):
            record = {**record, "method": label.format(method=record["method"])} if label else record
            if cell_key(record) in seen:
                raise SystemExit(f"Cell {cell_key(record)} appears twice (again in {part}).")
            seen.add(cell_key(record))
            results.append(record)
        if (part / LR_SEARCH_FILE).exists():
            searched = filter(keep, load_records(part / LR_SEARCH_FILE))
            lr_runs += [{**r, "method": label.format(method=r["method"])} if label else r for r in searched]
        if (part / CONFIG_FILE).exists():
            configs[str(part)] = json.loads((part / CONFIG_FILE).read_text())
        if (part / CONFIGS_FILE).exists():  # a merged folder keeps its parts' settings
            configs.update(json.loads((part / CONFIGS_FILE).read_text()))
    order = lambda r: (r["task"], r["method"], r.get("r") or 0, r["seed"], r.get("lr") or 0)  # noqa: E731
    out_dir.mkdir(parents=True, exist_ok=True)
    save_records(out_dir / RESULTS_FILE, sorted(results, key=order))
    save_records(out_dir / LR_SEARCH_FILE, sorted(lr_runs, key=order))
    (out_dir / CONFIGS_FILE).write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    write_report(out_dir / RESULTS_FILE)
    return len(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="grid folders to merge, then the published folder")
    parser.add_argument("--tasks", nargs="+", help="keep only these tasks")
    parser.add_argument("--methods", nargs="+", help="keep only these methods")
    args = parser.parse_args()
    if len(args.folders) < 2:
        parser.error("give at least one grid folder and the published folder")
    *sources, out = args.folders  # a source may read FOLDER=LABEL
    print(f"{merge(sources, out, args.tasks, args.methods)} records in {out}")


if __name__ == "__main__":
    main()
