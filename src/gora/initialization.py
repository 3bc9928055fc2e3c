"""GoRA's initialisation (pure tensor maths).

Notation (PEFT layout): W, Ḡ ∈ ℝ^{out×in}; A = lora_A.weight (r×in); B = lora_B.weight (out×r);
the adapter adds s·B A x with s = α/√r (rsLoRA). GoRA sets

    C = Ḡ Aᵀ (A Aᵀ)⁻¹                 (least-squares fit C A ≈ Ḡ)
    B = −(γ √in / α) · C
    ΔW₀ = s B A = −γ √(in/r) · Ḡ P_A, P_A = Aᵀ(AAᵀ)⁻¹A,

a descent step of Frobenius size ≈ γ‖Ḡ‖_F (a random r-dim subspace keeps ≈ r/in of ‖Ḡ‖²_F).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

DRAW_THREADS = 8
"""At most this many CPU threads draw the layers' seeded matrices (A_max, Ω)."""


def layer_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed per (seed, layer name): SHA-256, identical on every machine and process."""
    digest = hashlib.sha256(f"gora:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_a(seed: int, name: str, rows: int, in_features: int) -> Tensor:
    """A_max (rows × in), fp32 on CPU: Kaiming-uniform as in PEFT (a=√5, fan-in = in) = U(−1/√in, 1/√in).

    Drawn on the CPU from a per-layer generator, so every device and process gets the same A;
    a layer of rank r uses the first r rows.
    """
    generator = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name))
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(rows, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def solve_c(projected_grad: Tensor, gram: Tensor) -> Tensor:
    """C = (Ḡ Aᵀ)(A Aᵀ)⁻¹ from P = Ḡ Aᵀ (out × r) and the Gram matrix A Aᵀ (r × r).

    In float64: the r × r inverse from the Cholesky factor, then one product P · (A Aᵀ)⁻¹ (least squares for a
    Gram that is not positive definite); returns fp32. On the CPU the product is faster than a triangular solve
    with ``out`` right-hand sides (``benchmarks/results/cpu/fixed-cost/``), at the same float64 accuracy (the Gram
    of a random A is well conditioned).
    """
    gram64 = gram.double()
    factor, info = torch.linalg.cholesky_ex(gram64)
    if int(info) == 0:
        solution = projected_grad.double() @ torch.cholesky_inverse(factor)
    else:
        solution = torch.linalg.lstsq(gram64, projected_grad.double().t()).solution.t()
    return solution.float().contiguous()


def b_from_c(c: Tensor, gamma: float, in_features: int, lora_alpha: float) -> Tensor:
    """B = −(γ √in / α) · C. The minus sign makes ΔW₀ a descent step (official HEAD dropped it: ascent)."""
    return (-(gamma * math.sqrt(in_features) / lora_alpha) * c.double()).float()


def rslora_scaling(lora_alpha: float, rank: int) -> float:
    """Forward scaling s = α / √r (rsLoRA with the layer's own rank)."""
    return lora_alpha / math.sqrt(rank)


def initial_delta(a: Tensor, b: Tensor, lora_alpha: float) -> Tensor:
    """ΔW₀ = s · B A (out × in), fp32."""
    return rslora_scaling(lora_alpha, a.shape[0]) * (b.float() @ a.float())


def draw_omega(seed: int, name: str, in_features: int, columns: int) -> Tensor:
    """Seeded standard-Gaussian test matrix Ω (in × k), fp32 on CPU, for the sketched Frobenius norm."""
    generator = torch.Generator(device="cpu").manual_seed(layer_seed(seed, name + "#omega"))
    return torch.randn(in_features, columns, generator=generator, dtype=torch.float32)


@contextmanager
def draw_pool(layers: int) -> Iterator[ThreadPoolExecutor]:
    """CPU threads for ``draw_a``/``draw_omega`` calls (at most ``DRAW_THREADS``, the cores, the layers).

    Every layer has its own generator, so the values do not depend on the threads or the order. Leaving the block
    waits for the draws; leaving it by an exception cancels those not yet started.
    """
    workers = max(1, min(DRAW_THREADS, os.cpu_count() or 1, layers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gora-draw")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
