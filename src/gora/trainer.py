"""GoRA with ``transformers.Trainer`` (and TRL): estimation batches from a Trainer's data, and logging.

GoRA runs before ``Trainer`` exists, because the Trainer builds the optimizer over the model's
trainable parameters (GoRA's ranks must be in place by then)::

    batches = estimation_batches(train_dataset, data_collator, batch_size=8, num_steps=32, seed=0)
    state = estimate_gora(model, lora_config, batches)
    peft_model = apply_gora(model, lora_config, state)
    opt = create_loraplus_optimizer(model=peft_model, optimizer_cls=torch.optim.AdamW,
                                    lr=5e-5, loraplus_lr_ratio=16)          # optional, peft.optimizers
    trainer = Trainer(model=peft_model, args=args, train_dataset=train_dataset,
                      data_collator=data_collator, optimizers=(opt, None))
    add_gora_logging(trainer, state)                                        # ranks, budget, time -> reporters
    trainer.train()

TRL works the same way: ``SFTTrainer(model=peft_model, ...)`` without also passing ``peft_config``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from transformers import TrainerCallback, default_data_collator

from . import distributed
from .errors import GoraConfigError, GoraDataError, GoraTypeError
from .state import GoraState

logger = logging.getLogger(__name__)


def estimation_batches(
    dataset: Any,
    collator: Callable[[list], Any] | None = None,
    batch_size: int = 8,
    num_steps: int = 32,
    seed: int = 0,
    *,
    columns: Collection[str] | None = None,
    shard: bool = True,
) -> list:
    """``num_steps`` collated batches of ``batch_size`` examples drawn without replacement from ``dataset``.

    Under torch.distributed (``shard=True``) process p of P takes batches p, p+P, p+2P, ... of one
    shared shuffle, so the P processes together see exactly the batches one process would get with
    ``num_steps = P * num_steps`` (GoRA's DDP estimate equals that single-process estimate).

    Args:
        dataset: what a Trainer trains on: anything with ``len`` and integer indexing (a torch
            ``Dataset``, a ``datasets.Dataset``, a list of dicts).
        collator: the Trainer's ``data_collator``; ``None`` means ``transformers.default_data_collator``.
        batch_size: examples per batch (per process under torch.distributed).
        num_steps: batches to build; pass ``gora.batches.batches_needed(gora_config)`` (``num_steps``, plus
            ``gamma_batches`` for adaptive γ).
        seed: seed of the shuffle; a dataset smaller than ``batch_size * num_steps`` (times the processes) is
            reshuffled and reused, with a warning.
        columns: keys to keep from each (dict) example (like the Trainer's ``remove_unused_columns``);
            ``None`` keeps all. Every name must be a key of every example drawn.
        shard: give each torch.distributed process its own batches; ``False``: the same batches everywhere.

    Raises:
        GoraDataError: the dataset is empty or not indexable, or ``columns`` names a key an example lacks.
        GoraTypeError: ``columns`` is a single string rather than a collection of names.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GoraConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise GoraConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if isinstance(columns, str):
        raise GoraTypeError(f"columns must be a collection of column names, got the string {columns!r}; "
                            f"pass a list, e.g. columns=[{columns!r}].")
    try:
        size = len(dataset)
    except TypeError as error:
        raise GoraDataError(f"the dataset ({type(dataset).__name__}) has no len(); pass an indexable dataset "
                            "(torch Dataset, datasets.Dataset or a list of examples).") from error
    if size == 0:
        raise GoraDataError("the dataset is empty: GoRA needs examples to estimate gradients from.")
    collate = default_data_collator if collator is None else collator
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    needed = batch_size * num_steps * world
    if size < needed and rank == 0:
        processes = f" x {world} processes" if world > 1 else ""
        logger.warning("the dataset holds %d examples, fewer than the %d that %d steps x batch %d%s draw: examples "
                       "are reused (reshuffled), so the gradient estimate sees only %d distinct ones; pass fewer "
                       "steps or a smaller batch to use each example at most once.", size, needed, num_steps,
                       batch_size, processes, size)
    order = _shuffled_indices(size, needed, seed)
    batches = []
    for step in range(rank, num_steps * world, world):
        examples = [_select(dataset[i], columns, i) for i in order[step * batch_size:(step + 1) * batch_size]]
        batches.append(collate(examples))
    return batches


def _shuffled_indices(size: int, count: int, seed: int) -> list[int]:
    """``count`` indices: successive seeded permutations of ``range(size)`` (an epoch at a time)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(size, generator=generator).tolist()
    return order[:count]


def _select(example: Any, columns: Collection[str] | None, index: int) -> Any:
    """The ``columns`` of ``example`` (dataset row ``index``); a name the example lacks is refused, not dropped."""
    if columns is None:
        return example
    if not isinstance(example, Mapping):
        raise GoraDataError(f"columns= selects keys of dict examples, but dataset[{index}] is a "
                            f"{type(example).__name__}; pass columns=None for such a dataset.")
    unknown = sorted((name for name in columns if name not in example), key=str)
    if unknown:
        raise GoraDataError(f"columns {unknown} are not in dataset[{index}], which has {list(example)}; "
                            "pass only names from those (or columns=None to keep every column).")
    return {key: value for key, value in example.items() if key in columns}


class GoraLoggingCallback(TrainerCallback):
    """Reports GoRA's estimation to the Trainer's loggers; it never changes training.

    On train begin it logs the rank table (Python ``logging``, main process only). On the first
    ``on_log`` it adds ``gora/*`` scalars (budget, actual parameters, rank min/mean/max, adapted
    layers, estimation steps and seconds, γ) to the logged values, so the reporters that run after
    it (TensorBoard, W&B, ...) record them. ``Trainer`` runs user callbacks after its reporters:
    use :func:`add_gora_logging` to put this one first.
    """

    def __init__(self, state: GoraState) -> None:
        _check_state(state)
        self.gora_state = state
        self._reported = False

    def metrics(self) -> dict[str, float]:
        state = self.gora_state
        ranks = [state.ranks[name] for name in state.adapted]
        return {
            "gora/budget": state.budget,
            "gora/actual_params": state.actual_params,
            "gora/adapted_layers": len(ranks),
            "gora/rank_min": min(ranks, default=0),
            "gora/rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
            "gora/rank_max": max(ranks, default=0),
            "gora/estimation_steps": state.num_steps,
            "gora/estimation_samples": state.num_samples,
            "gora/estimation_seconds": state.estimation_seconds,
            "gora/gamma": state.gamma,
        }

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            logger.info("GoRA initialisation (%.1fs of estimation):\n%s", self.gora_state.estimation_seconds,
                        self.gora_state.summary())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._reported and logs is not None:
            logs.update(self.metrics())
            self._reported = True


def add_gora_logging(trainer: Any, state: GoraState) -> GoraLoggingCallback:
    """Insert a :class:`GoraLoggingCallback` ahead of the Trainer's reporters, and return it.

    Raises:
        GoraTypeError: ``state`` is not a GoraState (``None`` included), or ``trainer`` is not a Trainer;
            the trainer is left unchanged.
    """
    callback = GoraLoggingCallback(state)
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not isinstance(getattr(handler, "callbacks", None), list):
        raise GoraTypeError(f"add_gora_logging needs a transformers.Trainer (or a subclass such as TRL's "
                            f"SFTTrainer), got {type(trainer).__name__}.")
    handler.callbacks.insert(0, callback)
    return callback


def _check_state(state: Any) -> None:
    """Refuse anything but a GoraState up front, rather than an AttributeError once training starts."""
    if not isinstance(state, GoraState):
        got = "None" if state is None else f"a {type(state).__name__}"
        raise GoraTypeError(f"GoRA logging needs a GoraState, got {got}; pass the state returned by "
                            "estimate_gora, peft_model.gora_state (set by apply_gora and get_gora_model), or "
                            "GoraState.load(directory) for a saved one (a model from PeftModel.from_pretrained "
                            "carries none).")


__all__ = ["estimation_batches", "GoraLoggingCallback", "add_gora_logging"]
