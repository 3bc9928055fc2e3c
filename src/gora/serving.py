"""What LoRA servers accept of an exported adapter: vLLM's ``--max-lora-rank`` sizes (no torch import, for the CLI).

vLLM (2026) allows ``--max-lora-rank`` only from :data:`VLLM_MAX_LORA_RANKS` and refuses an adapter whose rank
exceeds it; SGLang assumes every layer has the adapter's global rank ``r`` and applies one ``lora_alpha / r``.
"""

from __future__ import annotations

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM allows that fits ``rank``; ``None`` beyond its largest size."""
    return next((size for size in VLLM_MAX_LORA_RANKS if size >= rank), None)


def serving_hint(rank: int) -> str:
    """One line on how to serve an adapter whose largest rank is ``rank``."""
    size = vllm_max_lora_rank(rank)
    if size is None:
        return (f"ranks up to {rank}: above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); vLLM cannot "
                "serve it (lower GoraConfig.max_rank and estimate again)")
    return f"ranks up to {rank}: serve with vLLM --max-lora-rank {size} (needs --max-lora-rank >= {rank})"


__all__ = ["VLLM_MAX_LORA_RANKS", "vllm_max_lora_rank", "serving_hint"]
