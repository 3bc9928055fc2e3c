"""gora: GoRA (Gradient-driven Adaptive Low Rank Adaptation, arXiv 2502.12171) on Hugging Face PEFT.

Notation (PyTorch/PEFT layout): layer i computes W_i x with W_i ∈ ℝ^{out_i × in_i};
A_i = ``lora_A.weight`` (r_i × in_i); B_i = ``lora_B.weight`` (out_i × r_i); the adapter adds
s_i · B_i A_i x with s_i = α/√r_i. r = ``lora_config.r`` (reference rank), α = ``lora_alpha``,
Ḡ_i the mean gradient of W_i over the estimation batches, γ the initial step size.

    peft_model = get_gora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]), batches)
"""

from .api import estimate_gora, get_gora_model
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
from .peft_bridge import apply_gora, export_adapter
from .state import GoraState

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
