"""Exact match on GSM-Symbolic: greedy answers generated for the items, their final numbers checked against gold.

Greedy decoding (batched, left padding, ``max_new_tokens`` bounded, stop at ``<|im_end|>``); the number after the
last ``####`` is checked with reasoning-gym's ``score_answer`` (1.0 for a match, 0.01 for another number, 0 for none;
only 1.0 counts). An output without ``####`` scores 0; the lenient score falls back to the last number in the output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from gora.bench.decoder import IM_END
from gora.bench.gsm_symbolic import GsmItem
from gora.bench.lm_format import collate_prompts, prompt_ids
from gora.bench.lm_scoring import eval_mode
from gora.progress import progress

STOP_TOKENS = (IM_END, "<|endoftext|>", "<|im_start|>")
"""Generation stops at any of these (a new ``<|im_start|>`` turn is not part of the answer)."""

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
    with eval_mode(model):
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
