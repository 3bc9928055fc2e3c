"""Protocol 2 of the grid (the default of ``gora bench grid``): controlled comparisons of GoRA's ingredients.

What changed from protocol 1 (:mod:`gora.bench.grid`, superseded) and why:

- **The new head has its own learning rate.** The classifier head (``modules_to_save``) trains in its own AdamW
  parameter group at one fixed ``head_lr`` for every arm, so an arm validated at a low adapter lr no longer trains
  its head slower. Chosen over a shared linear-probe warm start because it costs nothing per run and keeps the
  head-warm-up arm a real GoRA ingredient (a shared warm start would hand every arm a warmed head).
- **Arms isolate one ingredient each** against the baseline it modifies (:data:`ARMS`): LoRA, rsLoRA (GoRA's
  α/√r scaling), rsLoRA + LoRA+, GoRA, GoRA + LoRA+, GoRA with γ = 0 (allocation only), GoRA with every rank at r
  (initialisation only), GoRA's head warm-up, adaptive γ, and both. The wider field (PiSSA, LoRA-GA, EVA, DoRA,
  AdaLoRA, full fine-tuning, ...) runs as arms too.
- **A fixed number of steps with a learning curve**: mean training loss and validation loss/accuracy at 25, 50,
  100, 200, ... and the last step, so the step budget is an axis without extra runs.
- **The lr is chosen per (task, arm) on mean final validation loss over selection seeds disjoint from the test
  seeds**, from a geometric grid that is extended by one point past its edge whenever the choice sits at an edge
  (at most ``max_extensions`` times; the record says so). Selection runs go to ``lr_search.json`` only.
- **Every GoRA arm gets held-out batches** (the ``GAMMA_BATCHES`` training batches after its estimation batches)
  as ``eval_batches``; the core's init diagnostics (‖ΔW₀‖_F/‖W₀‖_F, held-out loss at W₀ and after init) go into
  the record.

Parallel workers: ``worker=(i, n)`` runs every n-th (task, arm) unit starting at i, selection then test seeds, so
no unit waits on another worker. Each worker appends to its own ``results.worker{i}of{n}.json`` and
``lr_search.worker{i}of{n}.json`` and then, under a file lock, merges every worker's files into ``results.json`` and
``lr_search.json`` (what the report reads). Runs already in any of these files are never recomputed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gora.bench.builders import MethodConfig
from gora.bench.gora_method import has_gora_field
from gora.bench.grid import (
    CONFIG_FILE,
    LR_SEARCH_FILE,
    RESULTS_FILE,
    _integers,
    _names,
    check_grid,
    check_out_dir,
    check_settings,
    grid_settings,
)
from gora.bench.lm_runner import LMRunner
from gora.bench.lm_tasks import LMConfig, check_lm_arms, is_lm_task
from gora.bench.records import Record, cell_key, load_records, save_records
from gora.bench.runner import CellRunner, DataConfig
from gora.bench.train import TrainConfig
from gora.errors import GoraConfigError
from gora.progress import progress

logger = logging.getLogger(__name__)

PROTOCOL = 2
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 16
DEFAULT_HEAD_LR = 1e-3
HEAD_WARMUP_STEPS = 50
DEFAULT_SELECTION_SEEDS = (100, 101)
DEFAULT_TEST_SEEDS = (0, 1, 2, 3, 4)
MAX_EXTENSIONS = 3
ARM_FIELDS = ("arm", "task", "seed", "r")
ARM_LR_FIELDS = ("arm", "task", "seed", "r", "lr")


@dataclass(frozen=True)
class Arm:
    """One arm: a method of :data:`gora.bench.methods.METHODS` plus the ``MethodConfig`` fields it changes."""

    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    fixed_rank: bool = False
    """GoRA with ``min_rank = max_rank = r``: LoRA's ranks, only GoRA's initialisation."""

    def method_overrides(self, r: int | None) -> dict[str, Any]:
        extra = {"gora_min_rank": r, "gora_max_rank": r} if self.fixed_rank and r is not None else {}
        return {**self.overrides, **extra}


_WARMUP = {"gora_head_warmup_steps": HEAD_WARMUP_STEPS}
ARMS: dict[str, Arm] = {
    "lora": Arm("lora"),
    "rslora": Arm("rslora"),
    "rslora_loraplus": Arm("rslora_loraplus"),
    "gora": Arm("gora"),
    "gora_loraplus": Arm("gora_loraplus"),
    "gora_gamma0": Arm("gora", {"gora_gamma": 0.0}),
    "gora_fixed_rank": Arm("gora", fixed_rank=True),
    "gora_head_warmup": Arm("gora", _WARMUP),
    "gora_adaptive_gamma": Arm("gora", {"gora_adaptive_gamma": True}),
    "gora_warmup_adaptive": Arm("gora", {**_WARMUP, "gora_adaptive_gamma": True}),
    # the wider field
    **{m: Arm(m) for m in ("pissa", "loraga", "eva", "dora", "adalora", "full", "loraplus", "olora")},
}
DEFAULT_ARMS = ("lora", "rslora", "rslora_loraplus", "gora", "gora_loraplus", "gora_gamma0", "gora_fixed_rank",
                "gora_head_warmup", "gora_adaptive_gamma", "gora_warmup_adaptive")
HEAD_WARMUP_ARMS = tuple(a for a, spec in ARMS.items() if spec.overrides.get("gora_head_warmup_steps"))

LR_GRID: dict[str, tuple[float, ...]] = {
    # Geometric, factor 2, four points per family; extended automatically when the choice sits at an edge.
    **{m: (2.5e-4, 5e-4, 1e-3, 2e-3) for m in ("lora", "dora", "olora", "eva")},
    # alpha / sqrt(r) scaling (rsLoRA, GoRA: 2.8x LoRA's at r = 8) or large initial factors (PiSSA, LoRA-GA)
    **{m: (1e-4, 2e-4, 4e-4, 8e-4) for m in ("rslora", "gora", "pissa", "loraga")},
    # LoRA+ trains B at 16x the rate
    **{m: (5e-5, 1e-4, 2e-4, 4e-4) for m in ("loraplus", "rslora_loraplus", "gora_loraplus")},
    "adalora": (2.5e-3, 5e-3, 1e-2, 2e-2),
    "full": (2.5e-5, 5e-5, 1e-4, 2e-4),
}
"""Default lr grid of each method; an arm uses its own entry when it has one, else its method's."""


class ArmRunnerProtocol(Protocol):
    """Runs one (arm, task, seed, r, lr); the record holds at least ``val_loss``. May have ``check(tasks)``.
    ``test=False`` (selection runs) leaves the test set alone: ``value`` is None."""

    def run(self, arm: str, task: str, seed: int, r: int | None, lr: float, *, test: bool = True) -> Record: ...


def lr_candidates(arm: str, lr_grid: Mapping[str, Sequence[float]] | None = None) -> tuple[float, ...]:
    """The arm's grid: ``lr_grid[arm]``, else the default of the arm, else of its method."""
    grid = {**LR_GRID, **(lr_grid or {})}
    rates = grid.get(arm) or grid.get(ARMS[arm].method)
    if not rates:
        raise GoraConfigError(f"No learning rates for arm {arm!r}; pass --lr {arm}=LR[,LR...].")
    return tuple(sorted(float(lr) for lr in rates))


def _loss(record: Record) -> float:
    value = record.get("val_loss")
    return float(value) if value is not None and math.isfinite(value) else math.inf


class ArmRunner(CellRunner):
    """:class:`CellRunner` for arms: the arm's method settings, a learning curve, the protocol-2 record fields.

    The task's kind picks who runs it: classifier tasks run here (MiniLM, a new head at ``head_lr``); causal-LM
    tasks (:data:`gora.bench.lm_tasks.LM_TASKS`) run in ``lm_runner`` (SmolLM2, the pretrained LM head, no head lr).
    """

    def __init__(self, train_config: TrainConfig, method_config: MethodConfig, data_config: DataConfig,
                 model_path: str | None = None, alpha_per_rank: float = 2.0, *, lm_config: LMConfig | None = None,
                 lm_runner: LMRunner | None = None) -> None:
        super().__init__(train_config, method_config, data_config, model_path, alpha_per_rank)
        self.lm_runner = lm_runner or LMRunner(train_config, method_config, data_config, lm_config or LMConfig(),
                                               alpha_per_rank)

    def check(self, tasks: Sequence[str]) -> None:
        lm = [t for t in tasks if is_lm_task(t) and t not in self.data_config.user_tasks]
        classifier = [t for t in tasks if t not in lm]
        if classifier:
            super().check(classifier)
        if lm:
            self.lm_runner.check(lm)

    def run(self, arm: str, task: str, seed: int, r: int | None, lr: float, *,  # type: ignore[override]
            test: bool = True) -> Record:
        spec = ARMS[arm]
        lm = is_lm_task(task) and task not in self.data_config.user_tasks
        runner = self.lm_runner.run if lm else super().run
        record = runner(spec.method, task, seed, r, lr, test=test, **spec.method_overrides(r))
        for name in ("init_relative_delta", "init_loss_w0", "init_loss_after"):
            record.setdefault(name, None)
        record.update(protocol=PROTOCOL, arm=arm, head_lr=None if lm else self.method_config.head_lr)
        return record


@dataclass
class Selection:
    """The lr chosen for one (task, arm) and how."""

    lr: float
    grid: list[float]
    extensions: int
    at_edge: bool
    val_loss: float
    seeds: tuple[int, ...]

    def fields(self) -> dict[str, Any]:
        if len(self.grid) == 1:
            how = "fixed lr (no search)"
        else:
            how = (f"val_loss mean over seeds {','.join(map(str, self.seeds))}; grid {self.grid[0]:g}.."
                   f"{self.grid[-1]:g} ({len(self.grid)} points, factor {self.grid[1] / self.grid[0]:g})")
            if self.extensions:
                how += f"; extended {self.extensions}x past an edge"
            if self.at_edge:
                how += "; still at the grid's edge"
        return {"selected_by": how, "lr_grid": self.grid, "lr_extensions": self.extensions,
                "lr_at_edge": self.at_edge, "selection_val_loss": self.val_loss,
                "selection_seeds": list(self.seeds)}


@contextmanager
def _locked(out_dir: Path):
    with open(out_dir / ".merge.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dedupe(records: Sequence[Record], fields: Sequence[str]) -> list[Record]:
    seen: dict[tuple, Record] = {}
    for record in records:
        seen.setdefault(cell_key(record, fields), record)
    return list(seen.values())


def merge_worker_files(out_dir: str | os.PathLike) -> tuple[list[Record], list[Record]]:
    """Merge every worker's files into ``results.json`` and ``lr_search.json`` (under a lock); return both."""
    out = Path(out_dir)
    with _locked(out):
        merged = []
        for name, fields in ((RESULTS_FILE, ARM_FIELDS), (LR_SEARCH_FILE, ARM_LR_FIELDS)):
            stem = name.removesuffix(".json")
            records = [r for path in [out / name, *sorted(out.glob(f"{stem}.worker*.json"))]
                       for r in load_records(path)]
            records = _dedupe(records, fields)
            save_records(out / name, records)
            merged.append(records)
    return merged[0], merged[1]


class ArmGrid:
    """Bookkeeping of one protocol-2 folder for one worker: what is done, what this worker runs next."""

    def __init__(self, out_dir: Path, runner: ArmRunnerProtocol, lr_grid, selection_seeds: Sequence[int],
                 max_extensions: int, worker: tuple[int, int]) -> None:
        self.out, self.runner, self.lr_grid = out_dir, runner, lr_grid
        self.selection_seeds, self.max_extensions = tuple(selection_seeds), max_extensions
        tag = f"worker{worker[0]}of{worker[1]}"
        self.results_path = out_dir / f"results.{tag}.json"
        self.lr_path = out_dir / f"lr_search.{tag}.json"
        results, lr_runs = self._read_all()
        self.done = {cell_key(r, ARM_FIELDS): r for r in results}
        self.lr_runs = {cell_key(r, ARM_LR_FIELDS): r for r in lr_runs}
        self.bar = None

    def _read_all(self) -> tuple[list[Record], list[Record]]:
        found = []
        for name in (RESULTS_FILE, LR_SEARCH_FILE):
            stem = name.removesuffix(".json")
            found.append([r for p in [self.out / name, *sorted(self.out.glob(f"{stem}.worker*.json"))]
                          for r in load_records(p)])
        return found[0], found[1]

    def _append(self, path: Path, record: Record) -> None:
        save_records(path, [*load_records(path), record])
        merge_worker_files(self.out)

    def _status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def selection_run(self, arm: str, task: str, seed: int, r: int | None, lr: float) -> Record:
        key = (arm, task, seed, r, lr)
        if key not in self.lr_runs:
            self._status(f"lr search {arm} {task} s{seed} lr={lr:g}")
            record = {**self.runner.run(arm, task, seed, r, lr, test=False), "role": "selection"}
            self._append(self.lr_path, record)
            self.lr_runs[key] = record
        return self.lr_runs[key]

    def select(self, arm: str, task: str, r: int | None) -> Selection:
        """Choose the lr on mean final validation loss; extend the grid while the choice is at an edge."""
        grid = list(lr_candidates(arm, self.lr_grid))
        if len(grid) == 1:
            return Selection(grid[0], grid, 0, False, math.nan, ())
        extensions = 0
        while True:
            means = {lr: sum(_loss(self.selection_run(arm, task, s, r, lr)) for s in self.selection_seeds)
                     / len(self.selection_seeds) for lr in grid}
            best = min(grid, key=lambda lr: means[lr])  # ties go to the first, lowest lr
            at_edge = best in (grid[0], grid[-1])
            if not at_edge or extensions == self.max_extensions:
                break
            factor = grid[1] / grid[0]
            grid = [grid[0] / factor, *grid] if best == grid[0] else [*grid, grid[-1] * factor]
            extensions += 1
            logger.info("%s on %s: lr %g is at the grid's edge; extending to %g..%g", arm, task, best, grid[0],
                        grid[-1])
        logger.info("%s on %s: lr %g chosen on mean validation loss %.4f", arm, task, best, means[best])
        return Selection(best, grid, extensions, at_edge, means[best], self.selection_seeds)

    def test_run(self, arm: str, task: str, seed: int, r: int | None, selection: Selection) -> None:
        key = (arm, task, seed, r)
        if key not in self.done:
            self._status(f"{arm} {task} s{seed}")
            record = self.runner.run(arm, task, seed, r, selection.lr)
            record.update(selection.fields(), protocol=PROTOCOL, arm=arm, role="test",
                          excluded_from_average=False)
            self._append(self.results_path, record)
            self.done[key] = record
        if self.bar is not None:
            self.bar.update(1)


def parse_worker(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise GoraConfigError(f"--worker expects I/N (e.g. 0/2), got {text!r}.") from None
    if not 0 <= index < count:
        raise GoraConfigError(f"--worker I/N needs 0 <= I < N, got {text!r}.")
    return index, count


def check_arms(arms: Sequence[str], test_seeds: Sequence[int], selection_seeds: Sequence[int], r: int,
               lr_grid: Mapping[str, Sequence[float]] | None, max_extensions: int, worker: tuple[int, int]) -> None:
    """Refuse protocol-2 settings that cannot run, before anything is loaded or written."""
    _names("arm", "--arms", arms, list(ARMS))
    _integers("test seeds", "--seeds", test_seeds, 0)
    _integers("selection seeds", "--selection-seeds", selection_seeds, 0)
    _integers("rank", "--ranks", [r], 1)
    if len(set(selection_seeds)) < 2:
        raise GoraConfigError(f"Protocol 2 chooses the lr over >= 2 selection seeds (--selection-seeds), got "
                              f"{list(selection_seeds)}.")
    if set(selection_seeds) & set(test_seeds):
        raise GoraConfigError(f"Selection seeds {sorted(set(selection_seeds) & set(test_seeds))} are also test "
                              "seeds; selection runs are never results: pass disjoint --selection-seeds and --seeds.")
    if isinstance(max_extensions, bool) or not isinstance(max_extensions, int) or max_extensions < 0:
        raise GoraConfigError(f"max_extensions must be an integer >= 0, got {max_extensions!r}.")
    if not (isinstance(worker, tuple) and len(worker) == 2 and 0 <= worker[0] < worker[1]):
        raise GoraConfigError(f"worker must be (index, count) with 0 <= index < count, got {worker!r}.")
    if lr_grid:
        _names("arm", "the learning-rate grid (--lr ARM=...)", list(lr_grid), list(ARMS))
    for arm in dict.fromkeys(arms):
        lr_candidates(arm, lr_grid)
    missing = [a for a in dict.fromkeys(arms) if a in HEAD_WARMUP_ARMS]
    if missing and not has_gora_field("head_warmup_steps"):
        raise GoraConfigError(f"Arms {missing} need GoraConfig.head_warmup_steps, which this version of gora lacks; "
                              "drop them from --arms or upgrade gora.")


def protocol_configs(train_config: TrainConfig | None, method_config: MethodConfig | None
                     ) -> tuple[TrainConfig, MethodConfig]:
    """Protocol 2's training and method settings: fixed steps with a curve, a head lr, GoRA's held-out batches."""
    train = train_config or TrainConfig(batch_size=DEFAULT_BATCH_SIZE)
    train = dataclasses.replace(train, steps=train.steps or DEFAULT_STEPS, curve=True)
    method = method_config or MethodConfig()
    method = dataclasses.replace(method, head_lr=method.head_lr or DEFAULT_HEAD_LR, gora_eval_batches=True,
                                 show_progress=train.progress)
    return train, method


def run_arm_grid(
    arms: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int] = DEFAULT_TEST_SEEDS,
    *,
    out_dir: str | os.PathLike,
    r: int = 8,
    selection_seeds: Sequence[int] = DEFAULT_SELECTION_SEEDS,
    lr_grid: Mapping[str, Sequence[float]] | None = None,
    max_extensions: int = MAX_EXTENSIONS,
    train_config: TrainConfig | None = None,
    method_config: MethodConfig | None = None,
    data_config: DataConfig | None = None,
    model_path: str | None = None,
    alpha_per_rank: float = 2.0,
    worker: tuple[int, int] = (0, 1),
    runner: ArmRunnerProtocol | None = None,
    lm_config: LMConfig | None = None,
) -> list[Record]:
    """Run this worker's share of the protocol-2 grid (arms x tasks, lr selection then test seeds); return every
    record merged into ``out_dir/results.json`` so far.

    Args:
        seeds: test seeds (the results); ``selection_seeds`` choose the lr and must be disjoint from them.
        r: reference rank (``lora_alpha = alpha_per_rank * r``); ``full`` runs with r None.
        lr_grid: per-arm (or per-method) learning rates overriding :data:`LR_GRID`; one value skips the search.
        worker: (index, count) of this process among ``count`` workers sharing ``out_dir``.
        runner: what runs one arm (default :class:`ArmRunner`: MiniLM for classifier tasks, SmolLM2 for the
            causal-LM tasks of :mod:`gora.bench.lm_tasks`); tests pass a stub.
        lm_config: settings of the causal-LM tasks (length, exact-match subset); stored with the grid's settings
            when ``tasks`` has such a task.

    Raises:
        GoraConfigError: an unknown arm or task, overlapping or too few seeds, any setting the grid cannot run
            with, or an ``out_dir`` that holds a grid made with other settings; checked before anything is written.
        GoraDataError: a task's data is missing, or ``out_dir`` holds damaged bookkeeping files.
    """
    train_config, method_config = protocol_configs(train_config, method_config)
    data_config = data_config or DataConfig()
    out = Path(out_dir)
    check_arms(arms, seeds, selection_seeds, r, lr_grid, max_extensions, worker)
    check_lm_arms(arms, [t for t in tasks if t not in data_config.user_tasks], HEAD_WARMUP_ARMS)
    lm_config = lm_config or LMConfig()
    methods = list(dict.fromkeys(ARMS[a].method for a in arms))
    check_grid(methods, tasks, seeds, [r], None, train_config, method_config, data_config, alpha_per_rank)
    check_out_dir(out)
    settings = {**grid_settings(train_config, method_config, data_config, alpha_per_rank), "protocol": PROTOCOL,
                "r": r, "selection_seeds": sorted(selection_seeds), "max_extensions": max_extensions}
    if any(is_lm_task(t) and t not in data_config.user_tasks for t in tasks):
        settings.update(lm_config.settings())
    check_settings(out, settings, write=False)
    runner = runner or ArmRunner(train_config, method_config, data_config, model_path, alpha_per_rank,
                                 lm_config=lm_config)
    check = getattr(runner, "check", None)
    if callable(check):
        check(tasks)
    grid = ArmGrid(out, runner, lr_grid, selection_seeds, max_extensions, worker)
    check_settings(out, settings)
    units = [(t, a) for t in tasks for a in dict.fromkeys(arms)][worker[0]::worker[1]]
    with progress(total=len(units) * len(seeds), desc=f"grid {worker[0]}/{worker[1]}", unit="run",
                  enabled=train_config.progress) as bar:
        grid.bar = bar
        for task, arm in units:
            rank = None if ARMS[arm].method == "full" else r
            if all((arm, task, s, rank) in grid.done for s in seeds):
                bar.update(len(seeds))
                continue
            selection = grid.select(arm, task, rank)
            for seed in seeds:
                grid.test_run(arm, task, seed, rank, selection)
    return merge_worker_files(out)[0]


__all__ = ["ARMS", "CONFIG_FILE", "DEFAULT_ARMS", "LR_GRID", "ArmRunner", "merge_worker_files", "parse_worker",
           "run_arm_grid"]
