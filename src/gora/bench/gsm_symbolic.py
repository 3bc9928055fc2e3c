"""GSM-Symbolic items from reasoning-gym, split by template into training, validation and test.

reasoning-gym's ``gsm_symbolic`` draws each item from one of 85 usable templates (ids 0-99, derived from GSM8K *test*
questions). The template id is ``dataset.task_indices[idx]``; ``metadata["source_index"]`` is the item's index in the
dataset, not its template. Training items come from templates 0-69 (64 usable); validation and test items from the
held-out templates 70-99 (21 usable): no template is on both sides. Items are walked in index order of one dataset
seeded with ``seed``; a held-out item with an even index goes to test, an odd one to validation, so validation and
test are disjoint and neither depends on the other's size or on the training size. Training items longer than the
length limit are skipped (the caller's ``keep_train``), never truncated, so every training target ends with
``#### N<|im_end|>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

GSM_TASK = "gsm_symbolic"
TRAIN_TEMPLATES = range(0, 70)
HELD_OUT_TEMPLATES = range(70, 100)
"""Validation (odd item index) and test (even item index) items come from these templates."""


@dataclass(frozen=True)
class GsmItem:
    """One GSM-Symbolic item: its index in the seeded dataset, its template id, question, gold answer and CoT."""

    index: int
    template: int
    question: str
    answer: str
    cot: str


@dataclass(frozen=True)
class GsmSplit:
    """Training items (templates 0-69), validation and test items (held-out templates 70-99, disjoint)."""

    train: list[GsmItem]
    validation: list[GsmItem]
    test: list[GsmItem]
    skipped: int
    """Training items refused by ``keep_train`` (too long)."""


def gsm_dataset(seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(GSM_TASK, size=size, seed=seed)


def split_items(
    train_size: int,
    val_size: int,
    test_size: int,
    seed: int = 0,
    keep_train: Callable[[GsmItem], bool] | None = None,
    train_templates: Sequence[int] = TRAIN_TEMPLATES,
    held_out_templates: Sequence[int] = HELD_OUT_TEMPLATES,
) -> GsmSplit:
    """Training, validation and test items, disjoint by template between training and the other two.

    Walks the dataset seeded with ``seed`` in index order: an item from ``train_templates`` goes to training (when
    ``keep_train`` accepts it); one from ``held_out_templates`` goes to test when its index is even, to validation
    when odd; until all three are full.
    """
    train_set, held_set = set(train_templates), set(held_out_templates)
    if train_set & held_set:
        raise ValueError(f"Train and held-out templates overlap: {sorted(train_set & held_set)}.")
    if min(train_size, val_size, test_size) < 0:
        raise ValueError(f"Sizes must be >= 0, got train {train_size}, validation {val_size}, test {test_size}.")
    size = 50 * (train_size + val_size + test_size) + 1000
    dataset = gsm_dataset(seed, size)
    templates = dataset.task_indices
    train: list[GsmItem] = []
    val: list[GsmItem] = []
    test: list[GsmItem] = []
    skipped = 0
    for idx in range(size):
        if len(train) >= train_size and len(val) >= val_size and len(test) >= test_size:
            break
        template = int(templates[idx])
        if template in held_set:
            target, limit = (test, test_size) if idx % 2 == 0 else (val, val_size)
        elif template in train_set:
            target, limit = train, train_size
        else:
            continue
        if len(target) >= limit:
            continue
        entry = dataset[idx]
        item = GsmItem(idx, template, entry["question"], str(entry["answer"]), entry["metadata"]["answer_cot"])
        if target is train and keep_train is not None and not keep_train(item):
            skipped += 1
            continue
        target.append(item)
    if len(train) < train_size or len(val) < val_size or len(test) < test_size:
        raise ValueError(f"Found only {len(train)} training, {len(val)} validation and {len(test)} test items in "
                         f"{size} draws ({skipped} training items too long); raise the length limit or lower the "
                         "sizes.")
    return GsmSplit(train, val, test, skipped)
