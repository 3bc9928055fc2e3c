"""The benchmark grid: methods x tasks x ranks x seeds, resumable, with learning rates chosen on validation.

For each (method, task, rank) the learning rate is picked from a small per-method grid by **validation** accuracy
on the first seed (never test); every seed then uses it. The selection runs go to ``lr_search.json``; the run at the
chosen rate on the first seed doubles as that seed's result. ``results.json`` is rewritten after every finished
cell, and cells already in it are skipped, so a killed grid loses at most the cell in flight. A grid folder is tied
to its settings (``grid_config.json``): resuming with different sizes or training settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from gora.bench.builders import MethodConfig
from gora.bench.gora_method import gora_config_for
from gora.bench.methods import METHODS
from gora.bench.records import LR_RUN_FIELDS, Record, append_record, cell_key, load_records
from gora.bench.runner import CellRunner, DataConfig, did_you_mean
from gora.bench.train import TrainConfig
from gora.devices import check_device
from gora.errors import GoraConfigError, GoraDataError, GoraError
from gora.progress import progress

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LR_SEARCH_FILE = "lr_search.json"
CONFIG_FILE = "grid_config.json"

DEFAULT_LR_GRID: dict[str, tuple[float, ...]] = {
    # Four rates each. The first H100 grid used only the first three and several methods chose the top one (LoRA,
    # GoRA, full fine-tuning, AdaLoRA); a grid must reach past each method's peak (benchmarks/results/h100/).
    "full": (2e-5, 5e-5, 1e-4, 2e-4),
    **{m: (2e-4, 5e-4, 1e-3, 2e-3) for m in ("lora", "dora", "olora", "eva")},
    # alpha / sqrt(r) scaling (rsLoRA, GoRA) or large initial factors (PiSSA, LoRA-GA): lower rates.
    **{m: (1e-4, 2e-4, 5e-4, 1e-3) for m in ("rslora", "gora", "pissa", "loraga")},
    # LoRA+ multiplies B's rate by 16.
    **{m: (5e-5, 1e-4, 2e-4, 5e-4) for m in ("loraplus", "rslora_loraplus", "gora_loraplus")},
    # AdaLoRA's adapters start at E = 0 with A, B ~ N(0, 0.02): its update grows ~100x slower than LoRA's at one
    # rate, and 200 steps at 2e-4..1e-3 left MiniLM at the majority class on every task (H100 grid, first pass).
    "adalora": (2e-3, 5e-3, 1e-2, 2e-2),
}


class Runner(Protocol):
    """Runs one cell. A runner may also have ``check(tasks)``, called before anything is written; it raises a
    ``GoraError`` for tasks it cannot run."""

    def run(self, method: str, task: str, seed: int, r: int | None, lr: float) -> Record: ...


def lr_candidates(method: str, lr_grid: Mapping[str, Sequence[float]] | None) -> tuple[float, ...]:
    grid = {**DEFAULT_LR_GRID, **(lr_grid or {})}
    if method not in grid or not grid[method]:
        raise GoraConfigError(f"No learning rates for method {method!r}; pass lr_grid={{{method!r}: [...]}} "
                              f"(--lr {method}=LR[,LR...]).")
    return tuple(float(lr) for lr in grid[method])


def select_lr(runs: Sequence[Record]) -> Record:
    """The run with the best validation score; ties go to the earliest run (grid order)."""
    if not runs:
        raise GoraConfigError("No learning-rate runs to choose from.")
    return max(runs, key=lambda r: (r["val_value"] if r["val_value"] is not None else float("-inf")))


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that cannot hold a grid folder (a file in its place)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GoraConfigError(f"out_dir {out_dir} exists and is not a folder; pass another --out-dir.")


def read_settings(out_dir: Path) -> dict | None:
    """The settings stored in ``out_dir`` (None when it has none)."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GoraDataError(f"{path} cannot be read ({err}); fix or delete it, or use a new out_dir.") from None
    if not isinstance(settings, dict):
        raise GoraDataError(f"{path} does not hold a settings object; fix or delete it, or use a new out_dir.")
    return settings


def check_settings(out_dir: Path, settings: dict, *, write: bool = True) -> None:
    """Record the grid's settings on first use; refuse to resume a folder made with other settings.

    With ``write=False`` only the comparison runs: nothing is created or written.
    """
    old = read_settings(out_dir)
    if old is not None:
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise GoraConfigError(
                f"{out_dir} holds a grid run with other settings (changed: {changed}); "
                "use a new out_dir, or delete its results to start over."
            )
        return
    if write:  # atomic: parallel workers may write the same settings at once
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{CONFIG_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, out_dir / CONFIG_FILE)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _names(kind: str, option: str, given, known: Sequence[str]) -> None:
    if isinstance(given, str) or not given:
        raise GoraConfigError(f"Need a list of one or more {kind}s ({option}), got {given!r}; "
                              f"known {kind}s: {', '.join(known)}.")
    unknown = [n for n in dict.fromkeys(given) if n not in known]
    if unknown:
        raise GoraConfigError(f"Unknown {kind}(s) {unknown} in {option}{did_you_mean(unknown, known)}; "
                              f"known {kind}s: {', '.join(known)}.")


def _integers(name: str, option: str, values, minimum: int) -> None:
    if isinstance(values, str) or not values or not all(_is_int(v) and v >= minimum for v in values):
        raise GoraConfigError(f"{name} must be a list of one or more integers >= {minimum} ({option}), got {values!r}.")


def check_grid(
    methods: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    ranks: Sequence[int],
    lr_grid: Mapping[str, Sequence[float]] | None,
    train_config: TrainConfig,
    method_config: MethodConfig,
    data_config: DataConfig,
    alpha_per_rank: float,
) -> None:
    """Refuse a grid that cannot run, before anything is loaded or written.

    Raises:
        GoraConfigError: an unknown method or task, no seeds or ranks, a bad learning-rate grid, rank scale,
            device or GoRA setting (the message names the setting and the accepted values).
        GoraDataError: a user task's file is missing.
    """
    _names("method", "--methods", methods, list(METHODS))
    data_config.check(tasks)
    _integers("seeds", "--seeds", seeds, 0)
    _integers("ranks", "--ranks", ranks, 1)
    if isinstance(alpha_per_rank, bool) or not isinstance(alpha_per_rank, numbers.Real) \
            or not math.isfinite(alpha_per_rank) or alpha_per_rank <= 0:
        raise GoraConfigError(f"alpha_per_rank must be a finite number > 0, got {alpha_per_rank!r}.")
    lr_grid = dict(lr_grid or {})
    if lr_grid:
        _names("method", "the learning-rate grid (--lr METHOD=...)", list(lr_grid), list(METHODS))
    for method, rates in lr_grid.items():
        if isinstance(rates, (str, bytes, Mapping)) or not isinstance(rates, Iterable) or not all(
                isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
                for lr in rates):
            raise GoraConfigError(f"Learning rates of {method!r} must be a list of finite numbers > 0 "
                                  f"(--lr {method}=LR[,LR...] or --lrs), got {rates!r}.")
    for method in dict.fromkeys(methods):
        lr_candidates(method, lr_grid)
    for config in (train_config, method_config, data_config):
        dataclasses.replace(config)  # re-runs __post_init__: catches fields changed after construction
    check_device(train_config.device)
    if any(m.startswith("gora") for m in methods):
        try:
            gora_config = gora_config_for(method_config)
            for r in ranks:
                gora_config.rank_bounds(r)
        except GoraError as err:
            raise GoraConfigError(f"GoRA settings (--gora-*, --gamma) are invalid: {err}") from None


def grid_settings(train_config: TrainConfig, method_config: MethodConfig, data_config: DataConfig,
                  alpha_per_rank: float) -> dict:
    """The settings that make results comparable (not the lists of methods, tasks and seeds, which may grow)."""
    train = {k: v for k, v in dataclasses.asdict(train_config).items() if k not in ("progress", "device")}
    method = {k: v for k, v in dataclasses.asdict(method_config).items()
              if k not in ("lr", "r", "seed", "total_steps", "show_progress")}
    data = {k: v for k, v in dataclasses.asdict(data_config).items() if k != "data_dir"}
    flat = {**{f"train.{k}": v for k, v in train.items()}, **{f"method.{k}": v for k, v in method.items()},
            **{f"data.{k}": v for k, v in data.items()}, "alpha_per_rank": alpha_per_rank}
    flat = {k: v for k, v in flat.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    return json.loads(json.dumps(flat))  # tuples -> lists, as they come back from the file


LATER_FIELDS = {"train.steps": None, "train.curve": False, "method.head_lr": None, "method.gora_eval_batches": False,
                "method.gora_head_warmup_steps": 0, "method.task_type": "SEQ_CLS"}
"""Settings added with protocol 2, left out of a folder's settings while at these defaults: a protocol-1 folder
written before they existed still resumes."""


class Grid:
    """Bookkeeping of one grid folder: what is done, what to run next."""

    def __init__(self, out_dir: Path, runner: Runner, lr_grid, bar=None) -> None:
        self.out_dir, self.runner, self.lr_grid, self.bar = out_dir, runner, lr_grid, bar
        self.results_path, self.lr_path = out_dir / RESULTS_FILE, out_dir / LR_SEARCH_FILE
        self.done = {cell_key(r): r for r in load_records(self.results_path)}
        self.lr_runs = {cell_key(r, LR_RUN_FIELDS): r for r in load_records(self.lr_path)}

    def lr_run(self, method: str, task: str, seed: int, r: int | None, lr: float) -> Record:
        key = (method, task, seed, r, lr)
        if key not in self.lr_runs:
            self.bar.set_postfix_str(f"lr search {method} {task} lr={lr:g}")
            self.lr_runs[key] = self.runner.run(method, task, seed, r, lr)
            append_record(self.lr_path, self.lr_runs[key])
        return self.lr_runs[key]

    def choose(self, method: str, task: str, seed: int, r: int | None) -> tuple[float, Record | None]:
        """(learning rate, the first seed's run at that rate when a search produced one)."""
        candidates = lr_candidates(method, self.lr_grid)
        if len(candidates) == 1:
            return candidates[0], None
        best = select_lr([self.lr_run(method, task, seed, r, lr) for lr in candidates])
        logger.info("%s on %s (r=%s): lr %g chosen on validation (%.4f)", method, task, r, best["lr"],
                    best["val_value"])
        return best["lr"], best

    def cell(self, method: str, task: str, seed: int, r: int | None, lr: float, reuse: Record | None) -> None:
        key = (method, task, seed, r)
        if key not in self.done:
            self.bar.set_postfix_str(f"{method} {task} seed={seed}")
            record = dict(reuse) if reuse is not None else self.runner.run(method, task, seed, r, lr)
            append_record(self.results_path, record)
            self.done[key] = record
        self.bar.update(1)


def run_grid(
    methods: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int] = (0,),
    *,
    out_dir: str | os.PathLike,
    ranks: Sequence[int] = (8,),
    lr_grid: Mapping[str, Sequence[float]] | None = None,
    train_config: TrainConfig | None = None,
    method_config: MethodConfig | None = None,
    data_config: DataConfig | None = None,
    model_path: str | None = None,
    alpha_per_rank: float = 2.0,
    runner: Runner | None = None,
) -> list[Record]:
    """Run every (method, task, rank, seed) cell not yet in ``out_dir/results.json``; return all its records.

    Args:
        ranks: reference ranks r (``lora_alpha = alpha_per_rank * r``); ``full`` runs once per task, with r None.
        lr_grid: per-method learning rates, overriding :data:`DEFAULT_LR_GRID`; one value skips the search.
        runner: what runs a cell (default :class:`CellRunner` on MiniLM); tests pass a stub.

    Raises:
        GoraConfigError: an unknown method or task, or any other setting the grid cannot run with (see
            :func:`check_grid`), or an ``out_dir`` that holds a grid made with other settings.
        GoraDataError: a task's data is missing, or ``out_dir`` holds damaged bookkeeping files.
        These are checked before any model or data set loads and before anything is written: a refused start
        leaves ``out_dir`` as it was (not created when it did not exist).
    """
    train_config = train_config or TrainConfig()
    method_config = dataclasses.replace(method_config or MethodConfig(), show_progress=train_config.progress)
    data_config = data_config or DataConfig()
    out = Path(out_dir)
    # Everything that can be refused is refused before the first write: a failed start leaves out_dir as it was.
    check_grid(methods, tasks, seeds, ranks, lr_grid, train_config, method_config, data_config, alpha_per_rank)
    check_out_dir(out)
    settings = grid_settings(train_config, method_config, data_config, alpha_per_rank)
    check_settings(out, settings, write=False)
    runner = runner or CellRunner(train_config, method_config, data_config, model_path, alpha_per_rank)
    check = getattr(runner, "check", None)
    if callable(check):
        check(tasks)  # the runner's own refusals (CellRunner: task data that is not there)
    grid = Grid(out, runner, lr_grid)  # reads what is done: a damaged results file is refused here
    check_settings(out, settings)
    plan = [(t, m, r) for t in tasks for r in ranks for m in methods if not (m == "full" and r != ranks[0])]
    with progress(total=len(plan) * len(seeds), desc="grid", unit="cell", enabled=train_config.progress) as bar:
        grid.bar = bar
        for task, method, r in plan:
            rank = None if method == "full" else r
            if all((method, task, s, rank) in grid.done for s in seeds):
                bar.update(len(seeds))
                continue
            lr, first_run = grid.choose(method, task, seeds[0], rank)
            for seed in seeds:
                grid.cell(method, task, seed, rank, lr, first_run if seed == seeds[0] else None)
    return load_records(out / RESULTS_FILE)
