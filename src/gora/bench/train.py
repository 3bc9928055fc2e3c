"""A plain PyTorch training and evaluation loop for sequence classification.

Texts are tokenised once per task (no padding); batches are padded dynamically. Training uses the method's
optimizer with a linear warmup/decay schedule, gradient clipping and, on CUDA when asked, bf16 autocast with fp32
master weights. The per-step callback (AdaLoRA) runs after ``optimizer.step()`` and before ``zero_grad()``.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from gora.bench.builders import Batch, BuiltMethod
from gora.bench.lm_scoring import eval_mode
from gora.devices import resolve_device
from gora.errors import GoraConfigError
from gora.progress import progress as progress_bar

logger = logging.getLogger(__name__)

Encoded = list[dict[str, list[int] | int]]


@dataclass
class TrainConfig:
    """Training settings shared by every method."""

    max_length: int = 64
    """Tokens per example (pairs are truncated longest-first)."""
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 1.0
    """Passes over the training split; fractions allowed (e.g. 0.5). Ignored when ``steps`` is set."""
    steps: int | None = None
    """Fixed number of optimizer steps (protocol 2; the data cycles in new seeded orders). None: ``epochs``."""
    curve: bool = False
    """Record a learning curve: mean training loss and validation loss/accuracy at :func:`checkpoint_steps`."""
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    bf16: bool = False
    """bf16 autocast on CUDA (ignored on CPU)."""
    device: str = "auto"
    """``auto`` = CUDA when available, else CPU."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise GoraConfigError(f"max_length must be >= 1 (--max-length), got {self.max_length}.")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise GoraConfigError(f"Batch sizes must be >= 1 (--batch-size), got {self.batch_size} / "
                                  f"{self.eval_batch_size}.")
        if not self.epochs > 0:
            raise GoraConfigError(f"epochs must be > 0 (--epochs), got {self.epochs}.")
        if self.steps is not None and self.steps < 1:
            raise GoraConfigError(f"steps must be >= 1 (--steps), got {self.steps}.")
        if not 0 <= self.warmup_ratio < 1:
            raise GoraConfigError(f"warmup_ratio must be in [0, 1) (--warmup-ratio), got {self.warmup_ratio}.")


@dataclass
class TrainResult:
    val_accuracy: float
    test_accuracy: float | None
    """None when the run skipped the test set (a protocol-2 selection run)."""
    train_seconds: float
    steps: int
    final_loss: float
    """Mean training loss over the last tenth of the steps."""
    peak_memory_bytes: int
    test_top_class_share: float | None
    """Share of test predictions in the most predicted class; 1.0 = collapsed to one class (not learned yet)."""
    curve: list[dict] | None = None
    """``[{"step", "train_loss", "val_loss", "val_metric"}, ...]`` when ``TrainConfig.curve`` is set."""
    val_loss: float | None = None
    """Mean validation cross-entropy after training (curve runs)."""
    eval_seconds: float = 0.0
    """Time spent on the curve's validation passes (not part of ``train_seconds``)."""


def _length(example: dict[str, list[int] | int]) -> int:
    ids = example["input_ids"]
    return len(ids) if isinstance(ids, list) else 1


def _label(example: dict[str, list[int] | int]) -> int:
    label = example["labels"]
    assert isinstance(label, int), "a classification example has one integer label"
    return label


def encode(df: pd.DataFrame, tokenizer, max_length: int) -> Encoded:
    """Tokenise a split once: one dict of token lists plus ``labels`` per example."""
    pairs = list(df["text_pair"]) if "text_pair" in df.columns else None
    enc = tokenizer(list(df["text"]), pairs, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": int(label)} for i, label in enumerate(df["label"])]


def collate(examples: Encoded, tokenizer, device: torch.device) -> Batch:
    """Pad a list of encoded examples to the longest one and move the tensors to ``device``."""
    batch = tokenizer.pad(examples, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def total_steps(num_examples: int, cfg: TrainConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, round(steps_per_epoch(num_examples, cfg.batch_size) * cfg.epochs))


def checkpoint_steps(steps: int, first: int = 25) -> list[int]:
    """Where a learning curve is measured: 25, 50, 100, 200, ... (doubling) below ``steps``, then ``steps``."""
    points, step = [], first
    while step < steps:
        points.append(step)
        step *= 2
    return [*points, steps]


def shuffled_batches(data: Encoded, batch_size: int, seed: int) -> Iterator[Encoded]:
    """Endless batches of examples: a new seeded permutation each epoch, the last partial batch kept."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            yield [data[i] for i in order[start : start + batch_size]]


def init_batches(data: Encoded, tokenizer, cfg: TrainConfig, seed: int, count: int) -> list[Batch]:
    """The first ``count`` training batches of the run (what GoRA, LoRA-GA and EVA initialise from)."""
    device = resolve_device(cfg.device)
    stream = shuffled_batches(data, cfg.batch_size, seed)
    return [collate(next(stream), tokenizer, device) for _ in range(count)]


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


def optimise(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], steps: int, *,
             warmup_ratio: float, max_grad_norm: float, progress: bool = True, desc: str = "train",
             autocast=None, step_callback=None, checkpoints=(), evaluate=None) -> dict:
    """``steps`` AdamW-style steps with linear warmup/decay and grad-norm clipping; the loop every bench task shares.

    ``batches`` yields ready batches for ``model(**batch).loss``; ``step_callback(step)`` runs after
    ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA). Returns ``train_seconds``, ``steps``, ``first_loss``
    and ``final_loss`` (mean of the last tenth). With ``checkpoints`` it also returns ``curve``: at each checkpoint
    step the mean training loss since the previous one plus what ``evaluate()`` returns, and ``eval_seconds`` (the
    time ``evaluate`` took, left out of ``train_seconds``).
    """
    from contextlib import nullcontext

    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    curve: list[dict] = []
    eval_seconds = 0.0
    checkpoints = set(checkpoints)
    model.train()
    start = time.perf_counter()
    for step in progress_bar(range(1, steps + 1), desc=desc, leave=False, enabled=progress, unit="step"):
        with autocast() if autocast is not None else nullcontext():
            loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        if step_callback is not None:
            step_callback(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # CPU-GPU sync point; negligible next to the step at these sizes
        if step in checkpoints:
            eval_start = time.perf_counter()
            since = losses[curve[-1]["step"] if curve else 0 :]
            curve.append({"step": step, "train_loss": sum(since) / len(since), **(evaluate() if evaluate else {})})
            eval_seconds += time.perf_counter() - eval_start
    seconds = time.perf_counter() - start - eval_seconds
    tail = losses[-max(1, len(losses) // 10) :]
    result: dict[str, Any] = {"train_seconds": seconds, "steps": steps, "first_loss": losses[0],
                              "final_loss": sum(tail) / len(tail)}
    if checkpoints:
        result.update(curve=curve, eval_seconds=eval_seconds)
    return result


def train(built: BuiltMethod, data: Encoded, tokenizer, cfg: TrainConfig, seed: int, desc: str = "train",
          val_data: Encoded | None = None) -> dict:
    """Train ``built.model`` in place; returns ``train_seconds``, ``steps`` and ``final_loss`` (and with
    ``cfg.curve`` the learning curve on ``val_data``: ``curve``, ``eval_seconds``)."""
    device = resolve_device(cfg.device)
    batches = (collate(b, tokenizer, device) for b in shuffled_batches(data, cfg.batch_size, seed))
    steps = total_steps(len(data), cfg)
    curve = {}
    if cfg.curve:
        if not val_data:
            raise ValueError("A learning curve needs validation data; raise the validation split's size.")

        def evaluate() -> dict:
            loss, metric = evaluate_loss_and_accuracy(built.model, val_data, tokenizer, cfg)
            return {"val_loss": loss, "val_metric": metric}

        curve = {"checkpoints": checkpoint_steps(steps), "evaluate": evaluate}
    result = optimise(built.model, built.optimizer, batches, steps,
                      warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, progress=cfg.progress,
                      desc=desc, autocast=lambda: _autocast(cfg, device), step_callback=built.step_callback, **curve)
    del result["first_loss"]
    return result


@torch.no_grad()
def evaluate_loss_and_accuracy(model: torch.nn.Module, data: Encoded, tokenizer, cfg: TrainConfig
                               ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on ``data``: length-sorted batches, eval mode, no gradients; the model's
    train/eval mode is restored afterwards."""
    device = resolve_device(cfg.device)
    with eval_mode(model):
        order = sorted(range(len(data)), key=lambda i: _length(data[i]))
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), cfg.eval_batch_size):
            batch = collate([data[i] for i in order[start : start + cfg.eval_batch_size]], tokenizer, device)
            labels = batch.pop("labels")
            with _autocast(cfg, device):
                logits = model(**batch).logits
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
    return loss_sum / len(data), correct / len(data)


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded, tokenizer, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(predicted classes, labels) in the order of ``data``; batches sorted by length to cut padding."""
    if not data:
        raise ValueError("Cannot evaluate on an empty split; raise the split's size.")
    device = resolve_device(cfg.device)
    model.eval()
    order = sorted(range(len(data)), key=lambda i: _length(data[i]))
    predicted = [0] * len(data)
    for start in range(0, len(order), cfg.eval_batch_size):
        chunk = order[start : start + cfg.eval_batch_size]
        batch = collate([data[i] for i in chunk], tokenizer, device)
        batch.pop("labels")
        with _autocast(cfg, device):
            classes = model(**batch).logits.argmax(-1).tolist()
        for i, c in zip(chunk, classes):
            predicted[i] = c
    return predicted, [_label(ex) for ex in data]


def accuracy(model: torch.nn.Module, data: Encoded, tokenizer, cfg: TrainConfig) -> float:
    """Share of examples whose argmax logit equals the label."""
    predicted, labels = predict(model, data, tokenizer, cfg)
    return sum(p == y for p, y in zip(predicted, labels)) / len(labels)


def top_class_share(predicted: Sequence[int]) -> float:
    """Share of predictions that go to the most predicted class: 1.0 means the classifier collapsed to one class."""
    return max(predicted.count(c) for c in set(predicted)) / len(predicted)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train_and_evaluate(
    built: BuiltMethod,
    splits: Sequence[Encoded],
    tokenizer,
    cfg: TrainConfig,
    seed: int,
    desc: str = "train",
    test: bool = True,
) -> TrainResult:
    """Train on ``splits[0]`` and report accuracy on ``splits[1]`` (validation) and ``splits[2]`` (test; with
    ``test=False`` the test set is not touched and its fields are None)."""
    train_split, val_split, test_split = splits
    device = resolve_device(cfg.device)
    stats = train(built, train_split, tokenizer, cfg, seed, desc, val_data=val_split)
    predicted, labels = predict(built.model, test_split, tokenizer, cfg) if test else ([], [])
    share = top_class_share(predicted) if test else None
    if share == 1.0:
        logger.warning("%s: every test prediction is class %d after %d steps (loss %.3f): the run has not learned "
                       "beyond the majority class; train longer (more steps, examples or epochs) or raise the lr.",
                       desc, predicted[0], stats["steps"], stats["final_loss"])
    curve = stats.get("curve")
    if curve:  # the last checkpoint is the last step: its validation pass is the final one
        stats["val_loss"] = curve[-1]["val_loss"]
    return TrainResult(
        val_accuracy=curve[-1]["val_metric"] if curve else accuracy(built.model, val_split, tokenizer, cfg),
        test_accuracy=sum(p == y for p, y in zip(predicted, labels)) / len(labels) if test else None,
        peak_memory_bytes=peak_memory_bytes(device),
        test_top_class_share=share,
        **stats,
    )
