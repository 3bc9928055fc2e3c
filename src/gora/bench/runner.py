"""One grid cell: load the task (cached), a fresh MiniLM classifier, build the method, train, evaluate, record."""

from __future__ import annotations

import difflib
import gc
import logging
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gora.bench.assets import default_model_path, load_classifier, load_tokenizer
from gora.bench.builders import MethodConfig
from gora.bench.lm_tasks import LM_TASKS
from gora.bench.methods import build_method, init_batch_count
from gora.bench.records import Record
from gora.bench.tasks import BUILTIN_TASKS, TaskData, check_task_source, load_task
from gora.bench.train import (
    Encoded,
    TrainConfig,
    encode,
    init_batches,
    reset_peak_memory,
    total_steps,
    train_and_evaluate,
)
from gora.bench.user_task import load_user_task, supported_table
from gora.devices import resolve_device
from gora.errors import GoraConfigError, GoraDataError

logger = logging.getLogger(__name__)

RECORD_INFO_FIELDS = (
    "init_seconds", "ranks", "gamma", "adaptive_gamma", "num_steps", "min_rank", "max_rank", "importance", "estimator",
    "budget", "actual_params", "estimation_seconds", "loraplus_ratio", "target_r", "init_batches",
    "init_relative_delta", "init_loss_w0", "init_loss_after", "head_warmup_steps",
)
"""Fields a builder may report that go into the record when present."""


def did_you_mean(unknown: Sequence[str], known: Sequence[str]) -> str:
    """`` (did you mean 'lora'?)`` for near misses of known names, else an empty string."""
    close = {n: m[0] for n in unknown if isinstance(n, str) and (m := difflib.get_close_matches(n, known, n=1))}
    if not close:
        return ""
    if len(unknown) == 1:
        return f" (did you mean {next(iter(close.values()))!r}?)"
    return " (did you mean " + ", ".join(f"{m!r} for {n!r}" for n, m in close.items()) + "?)"


@dataclass
class DataConfig:
    """Which data each task uses; the split seed is separate from the training seeds."""

    split_seed: int = 0
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    data_dir: str | None = None
    """Folder of ``<task>.csv.gz`` exports (and ``model/``); default ``$GORA_DATA_DIR``."""
    user_tasks: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Extra tasks: name -> (train file, test file), CSV or JSONL."""

    def __post_init__(self) -> None:
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, numbers.Integral) \
                or self.split_seed < 0:
            raise GoraConfigError(f"split_seed must be an integer >= 0 (--split-seed), got {self.split_seed!r}.")
        for name in ("max_train", "max_val", "max_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise GoraConfigError(f"{name} must be an integer >= 1 or None (--{name.replace('_', '-')}), "
                                      f"got {value!r}.")
        for name, files in self.user_tasks.items():
            if isinstance(files, (str, bytes)) or len(files) != 2:
                raise GoraConfigError(f"User task {name!r} needs (train file, test file), got {files!r}.")

    def known_tasks(self) -> list[str]:
        return [*BUILTIN_TASKS, *LM_TASKS, *(t for t in self.user_tasks if t not in BUILTIN_TASKS)]

    def check(self, names: Sequence[str]) -> None:
        """Refuse unknown task names and user tasks whose files are missing; loads nothing.

        Raises:
            GoraConfigError: no task, an unknown task, or a user-task file of an unsupported type.
            GoraDataError: a user-task file that does not exist.
        """
        if isinstance(names, str) or not names:
            raise GoraConfigError(f"Need a list of one or more tasks (--tasks), got {names!r}; "
                                  f"known tasks: {', '.join(self.known_tasks())}.")
        unknown = [n for n in dict.fromkeys(names)
                   if n not in self.user_tasks and n not in BUILTIN_TASKS and n not in LM_TASKS]
        if unknown:
            user = ", ".join(self.user_tasks) or "none declared"
            raise GoraConfigError(
                f"Unknown task(s) {unknown}{did_you_mean(unknown, self.known_tasks())}; "
                f"built-in tasks: {', '.join(BUILTIN_TASKS)}; causal-LM tasks: {', '.join(LM_TASKS)}; "
                f"user tasks: {user}. "
                "Declare your own task with --user-task NAME TRAIN TEST (DataConfig.user_tasks in Python)."
            )
        for name in dict.fromkeys(names):
            for role, file in zip(("train", "test"), self.user_tasks.get(name, ())):
                if not supported_table(file):
                    raise GoraConfigError(f"User task {name!r}: {role} file {file} is not .csv or .jsonl "
                                          "(optionally .gz); convert it or pass another file.")
                if not Path(file).is_file():
                    raise GoraDataError(f"User task {name!r}: {role} file {file} not found; check the path.")

    def check_sources(self, names: Sequence[str]) -> None:
        """:meth:`check`, then refuse built-in tasks whose data (export, package, sdist) is not available, and
        causal-LM tasks (their runner, :class:`gora.bench.lm_runner.LMRunner`, checks its own sources)."""
        self.check(names)
        lm = [n for n in dict.fromkeys(names) if n in LM_TASKS and n not in self.user_tasks]
        if lm:
            raise GoraConfigError(f"Task(s) {lm} are causal-LM tasks: they run in the protocol-2 grid only "
                                  f"(`gora bench grid --tasks {' '.join(lm)}`, without --protocol 1), not here.")
        for name in dict.fromkeys(names):
            if name not in self.user_tasks:
                check_task_source(name, self.data_dir)

    def load(self, name: str) -> TaskData:
        sizes: dict[str, Any] = {"max_train": self.max_train, "max_val": self.max_val, "max_test": self.max_test}
        if name in self.user_tasks:
            train_path, test_path = self.user_tasks[name]
            return load_user_task(train_path, test_path, name=name, split_seed=self.split_seed, **sizes)
        if name not in BUILTIN_TASKS:
            self.check([name])
        return load_task(name, split_seed=self.split_seed, data_dir=self.data_dir, **sizes)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


class CellRunner:
    """Runs single (method, task, seed, r, lr) cells; tasks, tokeniser and encodings are cached across cells."""

    def __init__(self, train_config: TrainConfig, method_config: MethodConfig, data_config: DataConfig,
                 model_path: str | None = None, alpha_per_rank: float = 2.0) -> None:
        self.train_config = train_config
        self.method_config = method_config
        self.data_config = data_config
        self.model_path = model_path or default_model_path(data_config.data_dir)
        self.alpha_per_rank = alpha_per_rank
        self._tokenizer = None
        self._tasks: dict[str, tuple[TaskData, tuple[Encoded, Encoded, Encoded]]] = {}

    def check(self, tasks: Sequence[str]) -> None:
        """Refuse tasks whose data is missing before any run starts (see :meth:`DataConfig.check_sources`)."""
        self.data_config.check_sources(tasks)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def task(self, name: str) -> tuple[TaskData, tuple[Encoded, Encoded, Encoded]]:
        if name not in self._tasks:
            data = self.data_config.load(name)
            length = self.train_config.max_length
            encoded = (encode(data.train, self.tokenizer, length), encode(data.validation, self.tokenizer, length),
                       encode(data.test, self.tokenizer, length))
            logger.info("Task %s: %s, %d labels, split seed %d", name, data.sizes(), data.num_labels, data.split_seed)
            self._tasks[name] = (data, encoded)
        return self._tasks[name]

    def method_config_for(self, r: int | None, lr: float, steps: int, seed: int) -> MethodConfig:
        rank = r if r is not None else self.method_config.r
        return replace(self.method_config, r=rank, lora_alpha=self.alpha_per_rank * rank, lr=lr,
                       total_steps=steps, seed=seed)

    def run(self, method: str, task: str, seed: int, r: int | None, lr: float, *, test: bool = True,
            **overrides) -> Record:
        """One run; ``overrides`` are ``MethodConfig`` fields changed for this run (protocol-2 arms); ``test=False``
        leaves the test set alone (``value`` None: a protocol-2 selection run)."""
        data, splits = self.task(task)
        cfg = self.method_config_for(r, lr, total_steps(len(splits[0]), self.train_config), seed)
        cfg = replace(cfg, **overrides) if overrides else cfg
        device = resolve_device(self.train_config.device)
        count = init_batch_count(method, cfg)
        batches = init_batches(splits[0], self.tokenizer, self.train_config, seed, count) if count else []
        reset_peak_memory(device)
        torch.manual_seed(seed)  # the head and every random adapter init draw from this
        model = load_classifier(self.model_path, data.num_labels).to(device)
        built = build_method(method, model, cfg, batches)
        desc = f"{method} {task} s{seed} lr{lr:g}"
        result = train_and_evaluate(built, splits, self.tokenizer, self.train_config, seed, desc, test)
        record = self.record(method, data, seed, cfg, built.info, result, device, full=(r is None))
        del model, built, batches
        gc.collect()
        return record

    def record(self, method, data, seed, cfg, info, result, device, full: bool) -> Record:
        tc = self.train_config
        record: Record = {
            "method": method, "task": data.name, "seed": seed, "metric": "accuracy",
            "value": result.test_accuracy, "val_value": result.val_accuracy,
            "trainable_params": info["trainable_params"], "train_seconds": result.train_seconds, "lr": cfg.lr,
            "r": None if full else cfg.r, "lora_alpha": None if full else cfg.lora_alpha,
            "init_seconds": None, "peak_memory_bytes": result.peak_memory_bytes, "ranks": None,
            "device": device_label(device), "steps": result.steps, "final_loss": result.final_loss,
            "test_top_class_share": result.test_top_class_share,
            "num_labels": data.num_labels, "split_seed": data.split_seed,
            **{f"{k}_size": v for k, v in data.sizes().items()},
            "max_length": tc.max_length, "batch_size": tc.batch_size, "epochs": tc.epochs, "bf16": tc.bf16,
        }
        record.update({k: info[k] for k in RECORD_INFO_FIELDS if k in info})
        if result.curve is not None:  # protocol 2
            labels = data.test["label"]
            record.update(curve=result.curve, val_loss=result.val_loss, eval_seconds=result.eval_seconds,
                          majority_rate=float(labels.value_counts().max() / len(labels)), epochs=None,
                          method=method)
        return record
