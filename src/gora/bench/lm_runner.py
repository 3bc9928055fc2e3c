"""The runner of the grid's causal-LM cells: one (method, task, seed, r, lr) run through the classifier tasks' arms,
builders, training loop (:func:`gora.bench.train.optimise`), lr selection and protocol-2 records.

Every arm builds through :func:`gora.bench.methods.build_method` with ``task_type="CAUSAL_LM"``, the seven Llama
projections as targets and no ``modules_to_save``: there is no new head, hence no head lr group, and the head-warm-up
arms are refused (:func:`gora.bench.lm_tasks.check_lm_arms`). GoRA arms get the ``GAMMA_BATCHES`` training batches
after their estimation batches as ``eval_batches``, exactly as in the classifier path, so the init diagnostics
(``init_relative_delta``, ``init_loss_w0``, ``init_loss_after``) fill the record.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from gora.bench.builders import MethodConfig
from gora.bench.decoder import MODEL_NAME, TARGET_MODULES, load_smollm2, load_smollm2_tokenizer
from gora.bench.gsm_symbolic import GSM_TASK
from gora.bench.lm_format import collate_train
from gora.bench.lm_splits import Evaluation, GsmTask, LabelWordClassification, LMTask
from gora.bench.lm_tasks import GSM_SIZES, LABEL_WORD_TASKS, LM_TASKS, TASK_KIND, LMConfig, check_lm_sources
from gora.bench.methods import build_method, init_batch_count
from gora.bench.records import Record
from gora.bench.train import (
    TrainConfig,
    _autocast,
    checkpoint_steps,
    optimise,
    peak_memory_bytes,
    reset_peak_memory,
    shuffled_batches,
)
from gora.devices import resolve_device
from gora.errors import GoraConfigError

logger = logging.getLogger(__name__)


class LMRunner:
    """Runs (method, task, seed, r, lr) cells of causal-LM tasks; model, tokenizer and task data load once, and each
    run trains a deep copy of the pristine model."""

    def __init__(self, train_config: TrainConfig, method_config: MethodConfig, data_config, lm_config: LMConfig,
                 alpha_per_rank: float = 2.0,
                 load: Callable[[], tuple[torch.nn.Module, Any]] | None = None, model_name: str = MODEL_NAME,
                 target_modules: Sequence[str] = TARGET_MODULES) -> None:
        """``load``: returns (model, tokenizer) (default: SmolLM2); the model is copied per run, never changed."""
        self.train_config, self.method_config, self.data_config = train_config, method_config, data_config
        self.lm_config, self.alpha_per_rank = lm_config, alpha_per_rank
        self._load, self.model_name, self.target_modules = load, model_name, tuple(target_modules)
        self._pristine: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._tasks: dict[str, LMTask] = {}

    def check(self, tasks: Sequence[str]) -> None:
        check_lm_sources(tasks, self.data_config.data_dir, model_needed=self._load is None)

    def loaded(self) -> tuple[torch.nn.Module, Any]:
        if self._pristine is None:
            start = time.perf_counter()
            if self._load is None:
                model_dir = self.lm_config.model_dir
                self._pristine = load_smollm2(model_dir, progress=self.train_config.progress)
                self._tokenizer = load_smollm2_tokenizer(model_dir)
            else:
                self._pristine, self._tokenizer = self._load()
            logger.info("%s loaded in %.1f s", self.model_name, time.perf_counter() - start)
        return self._pristine, self._tokenizer

    def task(self, name: str) -> LMTask:
        if name not in self._tasks:
            _, tokenizer = self.loaded()
            dc = self.data_config
            if name == GSM_TASK:
                given = {"train": dc.max_train, "validation": dc.max_val, "test": dc.max_test}
                sizes = {k: v if v is not None else GSM_SIZES[k] for k, v in given.items()}
                self._tasks[name] = GsmTask(tokenizer, sizes, dc.split_seed, self.lm_config)
            elif name in LABEL_WORD_TASKS:
                data = dc.load(LABEL_WORD_TASKS[name].base_task)
                self._tasks[name] = LabelWordClassification(name, tokenizer, data, self.lm_config)
            else:
                raise GoraConfigError(f"{name!r} is not a causal-LM task; these are {', '.join(LM_TASKS)}.")
            logger.info("Task %s: %s", name, self._tasks[name].info)
        return self._tasks[name]

    def method_config_for(self, r: int | None, lr: float, seed: int, **overrides: Any) -> MethodConfig:
        """The grid's method settings for a causal LM: its targets, no new head (so no head lr), CAUSAL_LM."""
        rank = r if r is not None else self.method_config.r
        cfg = replace(self.method_config, r=rank, lora_alpha=self.alpha_per_rank * rank, lr=lr, seed=seed,
                      total_steps=self.train_config.steps or 1, target_modules=self.target_modules,
                      modules_to_save=(), task_type="CAUSAL_LM", head_lr=None, **overrides)
        if cfg.gora_head_warmup_steps:
            raise GoraConfigError("Head warm-up trains a new classifier head; causal-LM tasks have none (they "
                                  "answer through the pretrained LM head): drop the head-warm-up arms.")
        return cfg

    def run(self, method: str, task: str, seed: int, r: int | None, lr: float, *, test: bool = True,
            **overrides: Any) -> Record:
        """One run; ``overrides`` are ``MethodConfig`` fields changed for this run (protocol-2 arms); ``test=False``
        leaves the test set alone (``value`` None: a protocol-2 selection run)."""
        steps = self.train_config.steps
        if not steps:
            raise GoraConfigError("Causal-LM tasks train a fixed number of steps (protocol 2, --steps).")
        data = self.task(task)
        pristine, tokenizer = self.loaded()
        tc = self.train_config
        cfg = self.method_config_for(r, lr, seed, **overrides)
        device = resolve_device(tc.device)
        ev = Evaluation(tokenizer, device, lambda: _autocast(tc, device), self.lm_config, tc.progress)

        def stream():
            return (collate_train(b, ev.pad_id, device) for b in shuffled_batches(data.train, tc.batch_size, seed))

        count = init_batch_count(method, cfg)
        first = stream()
        batches = [next(first) for _ in range(count)]  # the run's first batches, as in the classifier path
        reset_peak_memory(device)
        torch.manual_seed(seed)  # every random adapter init draws from this
        model = copy.deepcopy(pristine).to(device)
        built = build_method(method, model, cfg, batches)
        trained = built.model
        result = optimise(trained, built.optimizer, stream(), steps, warmup_ratio=tc.warmup_ratio,
                          max_grad_norm=tc.max_grad_norm, progress=tc.progress, desc=f"{method} {task} s{seed}",
                          autocast=ev.autocast, step_callback=built.step_callback,
                          checkpoints=checkpoint_steps(steps), evaluate=lambda: data.validate(trained, ev))
        fields: Record = {"value": None}
        test_seconds = None
        if test:
            start = time.perf_counter()
            fields = data.test_fields(trained, ev)
            test_seconds = time.perf_counter() - start
        curve = result["curve"]
        record = self.record(method, data, seed, cfg, built.info, result, device, full=(r is None))
        record.update(fields, curve=curve, val_loss=curve[-1]["val_loss"], val_value=curve[-1]["val_metric"],
                      test_eval_seconds=test_seconds)
        del model, built, batches
        gc.collect()
        return record

    def record(self, method: str, data: LMTask, seed: int, cfg: MethodConfig, info: Mapping[str, Any],
               result: Mapping[str, Any], device: torch.device, full: bool) -> Record:
        from gora.bench.runner import RECORD_INFO_FIELDS, device_label

        tc = self.train_config
        record: Record = {
            "method": method, "task": data.name, "seed": seed, "metric": data.metric,
            "trainable_params": info["trainable_params"], "train_seconds": result["train_seconds"], "lr": cfg.lr,
            "r": None if full else cfg.r, "lora_alpha": None if full else cfg.lora_alpha,
            "init_seconds": None, "peak_memory_bytes": peak_memory_bytes(device), "ranks": None,
            "device": device_label(device), "steps": result["steps"], "final_loss": result["final_loss"],
            "eval_seconds": result["eval_seconds"], "epochs": None, "task_kind": TASK_KIND, "model": self.model_name,
            "target_modules": list(cfg.target_modules), "split_seed": data.split_seed,
            "max_length": self.lm_config.max_length, "batch_size": tc.batch_size, "bf16": tc.bf16,
            **data.info,
        }
        record.update({k: info[k] for k in RECORD_INFO_FIELDS if k in info})
        return record
