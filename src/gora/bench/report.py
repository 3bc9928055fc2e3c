"""Tables and plots from a ``results.json``: mean ± std per method and task, accuracy bars, GoRA's rank heatmap."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gora.bench.records import Record, load_records

logger = logging.getLogger(__name__)

TABLE_FILE = "table.md"
ACCURACY_PLOT = "accuracy.png"
RANKS_PLOT = "gora_ranks.png"
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.(.+)$")


def parse_module_name(name: str) -> tuple[int, str] | None:
    """(layer index, module type) of ``...layer.3.attention.self.query`` -> (3, ``attention.self.query``).

    Returns None for modules outside the numbered layers (e.g. ``bert.pooler.dense``).
    """
    match = _LAYER.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def records_frame(records: Sequence[Record]) -> pd.DataFrame:
    if not records:
        raise ValueError("No records to report; run the grid first.")
    df = pd.DataFrame(list(records))
    missing = {"method", "task", "seed", "value"} - set(df.columns)
    if missing:
        raise ValueError(f"Records lack field(s) {sorted(missing)}; see benchmark-format.md.")
    if "arm" in df.columns:  # protocol 2: one row per arm (gora_gamma0 is method gora, but its own row)
        df["method"] = df["arm"].where(df["arm"].notna(), df["method"])
    if "r" in df.columns:  # a rank sweep: one row per (method, r) for methods run at several ranks
        swept = df.groupby("method")["r"].nunique()
        rows = df["method"].isin(swept[swept > 1].index) & df["r"].notna()
        df.loc[rows, "method"] = df.loc[rows, "method"] + " r=" + df.loc[rows, "r"].astype(int).astype(str)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, task): mean, sample std (0 for a single seed), count, mean trainable params."""
    grouped = df.groupby(["method", "task"], sort=False)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    if "trainable_params" in df.columns:
        out["params"] = grouped["trainable_params"].mean().to_numpy()
    return out


def _params(n: float) -> str:
    if n != n:  # NaN
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


LOWER_IS_BETTER = ("answer_loss", "loss", "val_loss")
"""Metrics shown as they are (not in %), lower is better: the causal-LM tasks' answer loss."""


def loss_tasks(df: pd.DataFrame) -> set[str]:
    """Tasks whose metric is a loss (lower is better); they stay out of 'avg' and the accuracy plot."""
    if "metric" not in df.columns:
        return set()
    return set(df.loc[df["metric"].isin(LOWER_IS_BETTER), "task"])


def markdown_table(df: pd.DataFrame) -> str:
    """Methods as rows, tasks as columns, mean ± std over seeds: accuracy in %, a loss metric as it is (lower is
    better, marked in the header); 'avg' = mean of the accuracy tasks' means."""
    s = summary(df)
    tasks = list(dict.fromkeys(df["task"]))
    methods = list(dict.fromkeys(df["method"]))
    losses = loss_tasks(df)
    metric_of = dict(zip(df["task"], df["metric"])) if losses else {}
    accuracy_tasks = [t for t in tasks if t not in losses]
    header = ["method", *(f"{t} ({metric_of[t]}, lower is better)" if t in losses else t for t in tasks), "avg",
              "trainable params", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        rows = s[s["method"] == method].set_index("task")
        cells = [("—" if t not in rows.index else
                  f"{rows.at[t, 'mean']:.4f} ± {rows.at[t, 'std']:.4f}" if t in losses else
                  f"{100 * rows.at[t, 'mean']:.2f} ± {100 * rows.at[t, 'std']:.2f}") for t in tasks]
        complete = accuracy_tasks and all(t in rows.index for t in accuracy_tasks)
        avg = f"{100 * rows.loc[accuracy_tasks, 'mean'].mean():.2f}" if complete else "—"
        params = _params(rows["params"].mean()) if "params" in rows else "—"
        seeds = "/".join(str(int(n)) for n in rows["n"].unique())
        lines.append("| " + " | ".join([method, *cells, avg, params, seeds]) + " |")
    return "\n".join(lines) + "\n" + collapse_note(df)


def collapse_note(df: pd.DataFrame) -> str:
    """A warning line when runs predicted one class for every test example (not learned beyond the majority)."""
    if "test_top_class_share" not in df.columns:
        return ""
    collapsed = df[df["test_top_class_share"] >= 1.0]
    if collapsed.empty:
        return ""
    cells = ", ".join(sorted({f"{m}/{t}" for m, t in zip(collapsed["method"], collapsed["task"])}))
    return (f"\nWarning: {len(collapsed)} of {len(df)} runs predict a single class on every test example "
            f"(majority-class accuracy; train longer): {cells}.\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(df: pd.DataFrame, path: Path) -> None:
    """Grouped bars: one group per task, one bar per method, error bars = std over seeds."""
    plt = _pyplot()
    s = summary(df)
    tasks, methods = list(dict.fromkeys(df["task"])), list(dict.fromkeys(df["method"]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * len(methods) ** 0.5 + 3), 4))
    for i, method in enumerate(methods):
        rows = s[s["method"] == method].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(x, 100 * rows["mean"], width, yerr=100 * rows["std"], capsize=2, label=method)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    low = 100 * (s["mean"] - s["std"]).min()
    ax.set_ylim(max(0, low - 5), min(100, 100 * (s["mean"] + s["std"]).max() + 3))
    ax.legend(fontsize=8, ncol=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_matrix(ranks: dict[str, float]) -> pd.DataFrame:
    """Layer index x module type table of ranks (modules outside numbered layers are left out)."""
    cells = [(*parsed, rank) for name, rank in ranks.items() if (parsed := parse_module_name(name))]
    if not cells:
        raise ValueError("No module name has a layer index (like 'encoder.layer.3.attention.self.query').")
    df = pd.DataFrame(cells, columns=["layer", "module", "rank"])
    return df.pivot_table(index="layer", columns="module", values="rank", aggfunc="mean")


def mean_ranks(records: Sequence[Record]) -> dict[str, float]:
    """Per-module rank averaged over the given records."""
    frame = pd.DataFrame([r["ranks"] for r in records])
    return frame.mean().to_dict()


def plot_rank_heatmaps(df: pd.DataFrame, path: Path, method: str = "gora") -> bool:
    """One heatmap per task of ``method``'s ranks (mean over seeds); False when no such record has ranks."""
    if "ranks" not in df.columns:
        return False
    rows = df[(df["method"] == method) & df["ranks"].apply(lambda r: isinstance(r, dict) and bool(r))]
    if rows.empty:
        return False
    plt = _pyplot()
    tasks = list(dict.fromkeys(rows["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        matrix = rank_matrix(mean_ranks(rows[rows["task"] == task].to_dict("records")))
        image = ax.imshow(matrix.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(matrix.index)), matrix.index)
        ax.set_ylabel("layer")
        ax.set_title(f"{method} ranks: {task}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``accuracy.png`` and (when GoRA records carry ranks) ``gora_ranks.png``.

    Args:
        results: a ``results.json`` file, or the folder holding one.
        out_dir: where to write; default the results file's folder.
    Returns:
        The paths written, keyed ``table``, ``accuracy``, ``ranks``.
    """
    path = Path(results)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m gora.bench grid --out-dir ...` first.")
    df = records_frame(load_records(path))
    out = Path(out_dir) if out_dir is not None else path.parent
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / TABLE_FILE, "accuracy": out / ACCURACY_PLOT}
    written["table"].write_text(markdown_table(df), encoding="utf-8")
    accuracy = df[~df["task"].isin(loss_tasks(df))]
    if accuracy.empty:
        del written["accuracy"]
    else:
        plot_accuracy(accuracy, written["accuracy"])
    if plot_rank_heatmaps(df, out / RANKS_PLOT):
        written["ranks"] = out / RANKS_PLOT
    logger.info("Report written: %s", ", ".join(str(p) for p in written.values()))
    return written
