"""Teacher-forced likelihood of answer tokens: the answer loss, and label words' log-likelihoods given prompts.

Position t predicts token t + 1, as in the model's own loss; only labelled tokens (not -100) count. Evaluation
batches are cut by padded tokens (:data:`EVAL_TOKENS`), which bounds the logits' memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from gora.bench.lm_format import Example, collate_train, labelled

EVAL_TOKENS = 4096
"""Padded tokens per evaluation forward pass: bounds the logits' memory (tokens x vocabulary floats)."""


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block; its train/eval mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


def scored_batches(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
                   autocast: Callable[[], Any] | None = None, max_tokens: int = EVAL_TOKENS
                   ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per evaluation batch (:func:`token_batches`): (indices into ``examples``, labels, logits), right padded.

    The forward passes run without gradients under ``autocast`` (when given), in eval mode; the model's mode is
    restored when the iteration ends.
    """
    with eval_mode(model):
        for chunk in token_batches([len(ex["input_ids"]) for ex in examples], max_tokens):
            batch = collate_train([examples[i] for i in chunk], pad_id, device)
            labels = batch.pop("labels")
            with torch.no_grad(), autocast() if autocast is not None else nullcontext():
                logits = model(**batch).logits
            yield chunk, labels, logits


def answer_nll(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
               autocast: Callable[[], Any] | None = None, max_tokens: int = EVAL_TOKENS) -> list[tuple[float, int]]:
    """Per example: (cross-entropy summed over its labelled tokens, their count), teacher-forced, in order.

    Eval mode; the model's mode is restored.
    """
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for chunk, labels, logits in scored_batches(model, examples, pad_id, device, autocast, max_tokens):
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                ignore_index=-100, reduction="none")
        counts = (targets != -100).sum(1).tolist()
        for i, total, count in zip(chunk, nll.sum(1).tolist(), counts):
            out[i] = (total, count)
    return out


def answer_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, device: torch.device,
                autocast: Callable[[], Any] | None = None) -> float:
    """Mean cross-entropy per answer token over ``examples`` (every answer token weighs the same)."""
    pairs = answer_nll(model, examples, pad_id, device, autocast)
    count = sum(n for _, n in pairs)
    if not count:
        raise ValueError("No answer tokens to score: every label is -100.")
    return sum(total for total, _ in pairs) / count


def next_token_log_probs(model: torch.nn.Module, prompts: Sequence[list[int]], token_ids: Sequence[int],
                         pad_id: int, device: torch.device, autocast: Callable[[], Any] | None = None,
                         max_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """(n, k) float64: log p(token_j | prompt_i), one forward pass per prompt (read at its last position).

    Eval mode; the model's mode is restored.
    """
    out = torch.empty(len(prompts), len(token_ids), dtype=torch.float64)
    ids = torch.tensor(list(token_ids), device=device)
    examples = [labelled(p, []) for p in prompts]
    for chunk, _, logits in scored_batches(model, examples, pad_id, device, autocast, max_tokens):
        last = torch.tensor([len(prompts[i]) - 1 for i in chunk], device=device)
        logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), last].float(), -1)
        out[chunk] = logp[:, ids].double().cpu()
    return out


def label_log_likelihoods(model: torch.nn.Module, prompts: Sequence[list[int]], words: Sequence[list[int]],
                          pad_id: int, device: torch.device, autocast: Callable[[], Any] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-likelihoods (n, k), token counts (k,)): log p(word_j | prompt_i) summed over the word's tokens.

    Words of one token each (the usual label words) cost one forward pass per prompt; otherwise each
    (prompt, word) pair is scored teacher-forced.
    """
    lengths = torch.tensor([len(w) for w in words])
    if all(len(w) == 1 for w in words):
        return next_token_log_probs(model, prompts, [w[0] for w in words], pad_id, device, autocast), lengths
    examples = [labelled(p, w) for p in prompts for w in words]
    nll = answer_nll(model, examples, pad_id, device, autocast)
    scores = -torch.tensor([total for total, _ in nll], dtype=torch.float64).view(len(prompts), len(words))
    return scores, lengths
