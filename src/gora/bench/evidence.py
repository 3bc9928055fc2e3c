"""Paired evidence from a protocol-v2 study folder: differences against a reference arm, intervals, plots.

Everything here is computed from the committed records alone (``results.json`` and its worker parts, and
``lr_search.json`` for the learning-rate picture), so anyone can recompute a published figure::

    python -m gora.bench.evidence benchmarks/results/cpu/evidence

Statistics. For an arm X, a reference R (``rslora``, ``lora``; ``gora`` for GoRA's variants; ``rslora_loraplus``
for GoRA + LoRA+, the baseline it modifies) and a task, the
paired difference of one seed is
``value(X, seed) - value(R, seed)``: both runs share the seed, hence the data order, the head's initialisation and
the estimation batches. The mean over seeds gets a two-sided 95 % Student-t interval (``n - 1`` degrees of
freedom); no conclusion is drawn from the rank order of means. ``"task": "average"`` first averages each seed's
difference over the tasks that stay in averages, then takes the interval over seeds.

A task leaves the averages, automatically, when no arm's mean beats the task's majority-class rate (nothing was
learned) or when every arm's mean is within 0.5 point of 100 % (saturated). It is still reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from gora.bench.records import Record, load_records
from gora.bench.report import _pyplot

REFERENCES = ("rslora", "lora", "gora", "rslora_loraplus")
"""Each arm is paired against these, but a reference in ``PAIRED_ONLY`` only with the arms named there."""
PAIRED_ONLY = {"gora": lambda arm: arm.startswith("gora_"), "rslora_loraplus": lambda arm: arm == "gora_loraplus"}
"""Against ``gora`` only GoRA's own variants (one ingredient each); against rsLoRA + LoRA+ only GoRA + LoRA+ (GoRA's
ingredients on the same optimiser and scaling)."""
FOREST_REFERENCES = ("rslora", "lora", "gora")
"""The forest plot's panels (a panel per reference; the one-arm comparisons stay in the tables)."""
SATURATION_MARGIN = 0.005
"""Every arm within this of a perfect score: the task is saturated and leaves averages."""
LOWER_IS_BETTER = ("answer_loss", "loss", "val_loss")
PLOT_TASKS = 4
"""The lr-sensitivity and convergence pictures draw a column for each of the first this many tasks (by name)."""

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard table values).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}; the normal 1.960 beyond the table (the table's last entry, df = 30, is 2.042)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its two-sided 95 % t interval (a single value has an unbounded one)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if n == 1:
        return mean, -math.inf, math.inf
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def arm_of(record: Record) -> str:
    return record.get("arm") or record["method"]


def read_study(folder: str | os.PathLike) -> tuple[list[Record], list[Record]]:
    """(results, selection runs) of a study folder; worker parts (``results.*.json``) are read with the main file.

    A run found in several files (a part and its merged copy) is counted once.
    """
    folder = Path(folder)

    def gather(stem: str) -> list[Record]:
        paths = [folder / f"{stem}.json", *sorted(folder.glob(f"{stem}.*.json"))]
        seen, out = set(), []
        for path in paths:
            for record in load_records(path):
                key = (arm_of(record), record.get("task"), record.get("seed"), record.get("r"), record.get("lr"))
                if key not in seen:
                    seen.add(key)
                    out.append(record)
        return out

    return gather("results"), gather("lr_search")


def _by(records: Iterable[Record], *fields: str) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for record in records:
        groups[tuple(record.get(f) if f != "arm" else arm_of(record) for f in fields)].append(record)
    return groups


def excluded_tasks(records: Sequence[Record]) -> dict[str, str]:
    """{task: reason} for the tasks that leave the averages (see the module docstring)."""
    reasons = {}
    for (task,), task_records in _by(records, "task").items():
        if task_records[0].get("metric") in LOWER_IS_BETTER:
            continue
        means = [statistics.fmean(r["value"] for r in rs) for rs in _by(task_records, "arm").values()]
        majority = [r["majority_rate"] for r in task_records if r.get("majority_rate") is not None]
        if majority and max(means) <= max(majority):
            reasons[task] = f"no arm beats the majority class ({max(majority):.4f}; best arm mean {max(means):.4f})"
        elif min(means) >= 1 - SATURATION_MARGIN:
            reasons[task] = f"saturated: every arm's mean is within {SATURATION_MARGIN * 100:g} point of 100 %"
    return reasons


def paired_differences(records: Sequence[Record], references: Sequence[str] = REFERENCES) -> list[dict]:
    """One entry per arm x reference x task (and ``average`` over two or more tasks), as in ``paired.json``."""
    excluded = excluded_tasks(records)
    values = {(arm_of(r), r["task"], r["seed"]): r["value"] for r in records}
    metric = {r["task"]: r.get("metric", "accuracy") for r in records}
    arms = sorted({arm_of(r) for r in records})
    tasks = sorted({r["task"] for r in records})
    out = []
    for reference in references:
        for arm in arms:
            if arm == reference or (reference in PAIRED_ONLY and not PAIRED_ONLY[reference](arm)):
                continue
            per_seed: dict[int, dict[str, float]] = defaultdict(dict)
            for task in tasks:
                seeds = sorted(s for (a, t, s) in values if a == arm and t == task and (reference, task, s) in values)
                diffs = [values[(arm, task, s)] - values[(reference, task, s)] for s in seeds]
                if not diffs:
                    continue
                for s, d in zip(seeds, diffs):
                    if task not in excluded:
                        per_seed[s][task] = d
                mean, low, high = mean_interval(diffs)
                out.append(_entry(task, arm, reference, metric[task], len(diffs), mean, low, high,
                                  excluded=task in excluded))
            averaged_tasks = sorted({t for d in per_seed.values() for t in d})
            complete = [s for s, d in per_seed.items() if averaged_tasks and set(d) == set(averaged_tasks)]
            if complete and len(averaged_tasks) > 1 and len({metric[t] for t in averaged_tasks}) == 1:
                diffs = [statistics.fmean(per_seed[s].values()) for s in sorted(complete)]
                mean, low, high = mean_interval(diffs)
                entry = _entry("average", arm, reference, metric[averaged_tasks[0]], len(diffs), mean, low, high)
                entry["tasks"] = averaged_tasks
                out.append(entry)
    return out


def _entry(task, arm, reference, metric, n, mean, low, high, excluded=False) -> dict:
    return {"task": task, "arm": arm, "reference": reference, "metric": metric, "n_seeds": n,
            "mean_diff": mean, "ci_low": low if math.isfinite(low) else None,
            "ci_high": high if math.isfinite(high) else None,
            "method_of_interval": "paired by seed; mean with two-sided 95 % Student-t interval (df = n - 1)",
            "excluded_from_average": excluded}


def verdict(entry: dict) -> str:
    """``helps``, ``hurts`` or ``tie`` (the interval contains 0, or is unbounded), in the metric's direction."""
    low, high = entry["ci_low"], entry["ci_high"]
    if low is None or high is None or low <= 0 <= high:
        return "tie"
    better = (low > 0) != (entry["metric"] in LOWER_IS_BETTER)
    return "helps" if better else "hurts"


def _points(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if metric in LOWER_IS_BETTER else f"{100 * value:+.2f}"


def markdown(entries: Sequence[dict], excluded: dict[str, str]) -> str:
    """The paired table: differences in points of accuracy (or in the metric's unit), interval, verdict."""
    lines = ["| task | arm | vs | seeds | mean diff | 95 % interval | verdict |", "|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: (e["reference"], e["task"] == "average", e["task"], e["arm"])):
        task = e["task"] + (" (left out of averages)" if e.get("excluded_from_average") else "")
        lines.append(f"| {task} | {e['arm']} | {e['reference']} | {e['n_seeds']} | "
                     f"{_points(e['mean_diff'], e['metric'])} | [{_points(e['ci_low'], e['metric'])}, "
                     f"{_points(e['ci_high'], e['metric'])}] | {verdict(e)} |")
    notes = [f"- {task}: left out of averages, {why}." for task, why in sorted(excluded.items())]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def arm_table(results: Sequence[Record]) -> str:
    """Per task and arm: test seeds, chosen lr (and whether it sits at the grid's edge), mean test score (with exact
    match where runs have it) and final validation loss, and GoRA's initial step (relative size, held-out loss
    change, γ) averaged over seeds."""
    lines = ["| task | arm | seeds | lr (grid) | test score, mean ± sd | val loss | ‖ΔW₀‖/‖W₀‖ | Δ held-out loss "
             "at init | γ |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, arm), runs in sorted(_by(results, "task", "arm").items()):
        values = [r["value"] for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        scale = 1 if runs[0].get("metric") in LOWER_IS_BETTER else 100
        grid = runs[0].get("lr_grid") or []
        edge = " **at edge**" if runs[0].get("lr_at_edge") else ""
        lrs = sorted({float(r["lr"]) for r in runs})
        lr = "/".join(f"{x:g}" for x in lrs) + (f" ({min(grid):g}..{max(grid):g}){edge}" if grid else "")
        delta = _mean([r.get("init_relative_delta") for r in runs])
        change = _mean([r["init_loss_after"] - r["init_loss_w0"] for r in runs
                        if r.get("init_loss_after") is not None and r.get("init_loss_w0") is not None])
        gamma = _mean([r.get("gamma") for r in runs]) if arm.startswith("gora") else None
        val = _mean([r.get("val_loss") for r in runs])
        digits = 4 if scale == 1 else 2  # a loss needs more digits than points of accuracy
        exact = _mean([r.get("exact_match") for r in runs])
        secondary = "" if exact is None else f" (exact match {100 * exact:.1f} %)"
        lines.append(f"| {task} | {arm} | {len(runs)} | {lr} | {scale * statistics.fmean(values):.{digits}f} ± "
                     f"{scale * sd:.{digits}f}{secondary} | {'—' if val is None else f'{val:.4f}'} | "
                     f"{'—' if delta is None else f'{delta:.1e}'} | {'—' if change is None else f'{change:+.5f}'} | "
                     f"{'—' if gamma is None else f'{gamma:.3g}'} |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _task_columns(tasks: Sequence[str]):
    """A figure of two rows and one column per task (the lr and convergence plots)."""
    return _pyplot().subplots(2, len(tasks), figsize=(5 * len(tasks), 6), squeeze=False)


def _log_axis(ax, xlabel: str) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short log ranges
    xs = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
    if xs and xs[-1] < 10 * xs[0]:  # less than a decade has no labelled major tick: label the points drawn
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a panel with no run of these arms has nothing to label
        ax.legend(fontsize=7)


def difference_units(entries: Sequence[dict]) -> str:
    """What a difference axis counts: points of accuracy, or the loss metric's own unit (lower is better)."""
    return ", ".join(sorted({f"{e['metric']}, lower is better" if e["metric"] in LOWER_IS_BETTER else "points"
                             for e in entries}))


def plot_forest(entries: Sequence[dict], path: Path) -> None:
    """One panel per reference: each arm's paired difference per task with its interval; 0 marked."""
    references = [r for r in FOREST_REFERENCES if any(e["reference"] == r for e in entries)]
    rows = sorted({(e["task"] == "average", e["task"], e["arm"]) for e in entries if e["reference"] in references})
    units = difference_units(entries)
    fig, axes = _pyplot().subplots(1, len(references), figsize=(6 * len(references), 0.28 * len(rows) + 1.5),
                                   sharey=True, squeeze=False)
    for ax, reference in zip(axes[0], references):
        lookup = {(e["task"], e["arm"]): e for e in entries if e["reference"] == reference}
        for y, (_, task, arm) in enumerate(rows):
            e = lookup.get((task, arm))
            if e is None:
                continue
            scale = 1 if e["metric"] in LOWER_IS_BETTER else 100
            low = e["ci_low"] if e["ci_low"] is not None else e["mean_diff"]
            high = e["ci_high"] if e["ci_high"] is not None else e["mean_diff"]
            colour = {"helps": "tab:green", "hurts": "tab:red", "tie": "tab:gray"}[verdict(e)]
            ax.plot([scale * low, scale * high], [y, y], color=colour, lw=2)
            ax.plot(scale * e["mean_diff"], y, "o", color=colour, ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"paired difference vs {reference} ({units}; 95 % t interval)")
        ax.set_yticks(range(len(rows)), [f"{task}: {arm}" for _, task, arm in rows], fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def lr_table(selection: Sequence[Record]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """{(task, arm): [(lr, mean validation loss, mean validation metric), ...]} over the selection seeds."""
    table: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for (task, arm, lr), runs in sorted(_by(selection, "task", "arm", "lr").items(), key=lambda kv: str(kv[0])):
        losses = [r["val_loss"] for r in runs if r.get("val_loss") is not None]
        metrics = [r["val_value"] for r in runs if r.get("val_value") is not None]
        if losses:
            table[(task, arm)].append((float(lr), statistics.fmean(losses),
                                       statistics.fmean(metrics) if metrics else math.nan))
    return {k: sorted(v) for k, v in table.items()}


def plot_lr_sensitivity(selection: Sequence[Record], path: Path, arms: Sequence[str] = ("lora", "rslora", "gora"),
                        tasks: Sequence[str] | None = None) -> bool:
    """Validation loss and metric against lr (log axis), one column per task; False when there is nothing to draw."""
    table = lr_table(selection)
    tasks = list(tasks or sorted({t for t, a in table if a in arms}))[:PLOT_TASKS]
    if not tasks:
        return False
    fig, axes = _task_columns(tasks)
    for col, task in enumerate(tasks):
        for arm in arms:
            points = table.get((task, arm))
            if not points:
                continue
            lrs, losses, metrics = zip(*points)
            axes[0][col].plot(lrs, losses, "o-", label=arm)
            if not all(math.isnan(m) for m in metrics):  # a loss-only task (answer loss) has no accuracy
                axes[1][col].plot(lrs, [100 * m for m in metrics], "o-", label=arm)
        axes[0][col].set_title(task)
        axes[0][col].set_ylabel("validation loss (mean of selection seeds)")
        axes[1][col].set_ylabel("validation accuracy, %")
        for ax in (axes[0][col], axes[1][col]):
            _log_axis(ax, "learning rate")
        if not axes[1][col].get_lines():
            axes[1][col].set_visible(False)
    _save(fig, path)
    return True


def mean_curve(runs: Sequence[Record], field: str = "val_loss") -> list[tuple[int, float]]:
    """(step, mean of ``field``) over runs at the checkpoints every run has."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for point in run.get("curve") or []:
            if point.get(field) is not None:
                per_step[int(point["step"])].append(float(point[field]))
    return [(s, statistics.fmean(v)) for s, v in sorted(per_step.items()) if len(v) == len(runs)]


def common_lr(selection: Sequence[Record], task: str, arms: Sequence[str]) -> float | None:
    """A learning rate every arm ran at in the selection runs of ``task`` (the middle one when several)."""
    sets = [{float(r["lr"]) for r in selection if r["task"] == task and arm_of(r) == arm} for arm in arms]
    shared = sorted(set.intersection(*sets)) if sets and all(sets) else []
    return shared[len(shared) // 2] if shared else None


def plot_convergence(results: Sequence[Record], selection: Sequence[Record], path: Path,
                     arms: Sequence[str] = ("lora", "rslora", "gora"), tasks: Sequence[str] | None = None) -> bool:
    """Validation loss against steps: each arm at its chosen lr (test seeds) and all at one common lr (selection
    seeds); one column per task. False when no run has a curve."""
    tasks = list(tasks or sorted({r["task"] for r in results if r.get("curve")}))[:PLOT_TASKS]
    if not tasks:
        return False
    fig, axes = _task_columns(tasks)
    for col, task in enumerate(tasks):
        for arm in arms:
            runs = [r for r in results if r["task"] == task and arm_of(r) == arm]
            curve = mean_curve(runs)
            if curve:
                steps, losses = zip(*curve)
                axes[0][col].plot(steps, losses, "o-", label=f"{arm} (lr {runs[0]['lr']:g})")
        axes[0][col].set_title(f"{task}: each arm at its chosen lr")
        lr = common_lr(selection, task, arms)
        for arm in arms if lr is not None else ():
            curve = mean_curve([r for r in selection if r["task"] == task and arm_of(r) == arm
                                and float(r["lr"]) == lr])
            if curve:
                steps, losses = zip(*curve)
                axes[1][col].plot(steps, losses, "o-", label=arm)
        axes[1][col].set_title(f"{task}: every arm at lr {lr:g}" if lr is not None else f"{task}: no common lr")
        for ax in axes[:, col]:
            _log_axis(ax, "training step")
            ax.set_ylabel("validation loss")
    _save(fig, path)
    return True


def write_evidence(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``paired.json``, ``paired.md``, ``arms.md`` (chosen lr, scores, GoRA's initial step) and the three plots
    for a study folder; returns what was written."""
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder
    results, selection = read_study(folder)
    if not results:
        raise FileNotFoundError(f"{folder} holds no results.json records; run the study first.")
    out.mkdir(parents=True, exist_ok=True)
    entries = paired_differences(results)
    written = {"paired.json": out / "paired.json", "paired.md": out / "paired.md", "arms.md": out / "arms.md"}
    written["paired.json"].write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    written["paired.md"].write_text(markdown(entries, excluded_tasks(results)), encoding="utf-8")
    written["arms.md"].write_text(arm_table(results), encoding="utf-8")
    if entries:
        plot_forest(entries, out / "paired_differences.png")
        written["paired_differences.png"] = out / "paired_differences.png"
    if plot_lr_sensitivity(selection, out / "lr_sensitivity.png"):
        written["lr_sensitivity.png"] = out / "lr_sensitivity.png"
    if plot_convergence(results, selection, out / "convergence.png"):
        written["convergence.png"] = out / "convergence.png"
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gora.bench.evidence", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a protocol-v2 study folder (results.json, lr_search.json)")
    parser.add_argument("--out-dir", help="where to write (default: the study folder)")
    args = parser.parse_args(argv)
    for path in write_evidence(args.folder, args.out_dir).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
