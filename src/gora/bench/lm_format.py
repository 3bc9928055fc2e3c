"""How the causal-LM tasks lay out text in tokens: chat prompts, labelled answers after them, padded batches.

The prompt is the model's own chat template (which adds SmolLM2's default system prompt) with the question or the
instruction and text as the user turn, ending with the assistant cue. An example is the prompt followed by its answer
(a GSM item's chain of thought ``metadata["answer_cot"]`` ending in ``#### N``, then ``<|im_end|>``; or a class's
label word): only the answer's tokens are labelled. Prompt and answer are tokenised separately and concatenated,
exactly as generation sees them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gora.bench.decoder import IM_END
from gora.bench.gsm_symbolic import GsmItem

Example = dict[str, Any]
"""``input_ids`` and ``labels`` (-100 on the prompt) token lists, ready for :func:`collate_train`."""
Batch = dict[str, torch.Tensor]


def text_ids(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` as they are, without special tokens added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer, question: str) -> str:
    """The chat-template prompt (SmolLM2's default system prompt, the question as user turn, assistant cue)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return text_ids(tokenizer, prompt_text(tokenizer, question))


def fitted_prompt(tokenizer, instruction: str, text: str, budget: int) -> tuple[list[int], bool]:
    """(the chat prompt of ``instruction``, a blank line and ``text``; whether ``text`` was cut): when the prompt
    exceeds ``budget`` tokens, the text loses tokens from its end until it fits.

    Raises:
        ValueError: the instruction and the chat template alone exceed ``budget``.
    """
    ids = prompt_ids(tokenizer, f"{instruction}\n\n{text}")
    if len(ids) <= budget:
        return ids, False
    tokens = text_ids(tokenizer, text)
    keep = len(tokens)
    while len(ids) > budget:
        keep -= len(ids) - budget
        if keep <= 0:
            raise ValueError(f"the prompt's instruction and chat template alone exceed {budget} tokens")
        ids = prompt_ids(tokenizer, f"{instruction}\n\n{tokenizer.decode(tokens[:keep])}")
    return ids, True


def labelled(prompt: list[int], answer: list[int]) -> Example:
    """``input_ids`` = prompt + answer; ``labels`` = -100 on the prompt, the answer's ids after it."""
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def encode_example(tokenizer, item: GsmItem) -> Example:
    """A GSM item: the chat prompt, then the answer CoT + ``<|im_end|>`` as the only labelled tokens."""
    return labelled(prompt_ids(tokenizer, item.question), text_ids(tokenizer, item.cot + IM_END))


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
