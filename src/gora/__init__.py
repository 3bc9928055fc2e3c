"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation, arXiv 2502.12171) on Hugging Face PEFT.

Notation (PyTorch/PEFT layout): layer i computes W_i x with W_i ∈ ℝ^{out_i × in_i};
A_i = ``lora_A.weight`` (r_i × in_i); B_i = ``lora_B.weight`` (out_i × r_i); the adapter adds
s_i · B_i A_i x with s_i = α/√r_i. r = ``lora_config.r`` (reference rank), α = ``lora_alpha``,
Ḡ_i the mean gradient of W_i over the estimation batches, γ the initial step size.

    peft_model = get_gora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]), batches)
"""

from typing import TYPE_CHECKING

from .config import GoraConfig
from .errors import (
    GoraConfigError,
    GoraDataError,
    GoraError,
    GoraNumericalError,
    GoraStateError,
    GoraTargetError,
    GoraUnsupportedError,
)

if TYPE_CHECKING:
    from .api import estimate_gora, get_gora_model
    from .peft_bridge import apply_gora, export_adapter
    from .state import GoraState

# torch, transformers and peft load on first use (PEP 562), so `gora --help` stays fast.
_LAZY = {
    "estimate_gora": ".api",
    "get_gora_model": ".api",
    "apply_gora": ".peft_bridge",
    "export_adapter": ".peft_bridge",
    "GoraState": ".state",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "GoraConfig",
    "GoraState",
    "estimate_gora",
    "apply_gora",
    "get_gora_model",
    "export_adapter",
    "GoraError",
    "GoraConfigError",
    "GoraDataError",
    "GoraNumericalError",
    "GoraStateError",
    "GoraTargetError",
    "GoraUnsupportedError",
]
