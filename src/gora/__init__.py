"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation, arXiv 2502.12171) on Hugging Face PEFT.

Notation (PyTorch/PEFT layout): layer i computes W_i x with W_i ∈ ℝ^{out_i × in_i};
A_i = ``lora_A.weight`` (r_i × in_i); B_i = ``lora_B.weight`` (out_i × r_i); the adapter adds
s_i · B_i A_i x with s_i = α/√r_i. r = ``lora_config.r`` (reference rank), α = ``lora_alpha``,
Ḡ_i the mean gradient of W_i over the estimation batches, γ the initial step size.

    peft_model = get_gora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]), batches)

The public names are imported lazily (PEP 562), so ``gora --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .versions import __version__  # its one home: versions.py (no torch there)

_EXPORTS = {
    "GoraConfig": "config",
    "GoraState": "state",
    "estimate_gora": "api",
    "apply_gora": "peft_bridge",
    "get_gora_model": "api",
    "export_adapter": "export",
    "GoraError": "errors",
    "GoraConfigError": "errors",
    "GoraDataError": "errors",
    "GoraNumericalError": "errors",
    "GoraStateError": "errors",
    "GoraTargetError": "errors",
    "GoraUnsupportedError": "errors",
    "GoraTypeError": "errors",
    "GoraConfigTypeError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from .api import estimate_gora, get_gora_model
    from .config import GoraConfig
    from .errors import (
        GoraConfigError,
        GoraConfigTypeError,
        GoraDataError,
        GoraError,
        GoraNumericalError,
        GoraStateError,
        GoraTargetError,
        GoraTypeError,
        GoraUnsupportedError,
    )
    from .export import export_adapter
    from .peft_bridge import apply_gora
    from .state import GoraState
