"""The sketch path's per-gradient update: ``S += G A_maxᵀ`` with ``F += (W ⊙ G) Ω``, in bounded row blocks.

Instead of the full (out × in) gradient sum, the sketch path keeps two thin fp32 sums per layer: the projection
``S = Σ_t G_t A_maxᵀ`` (out × r_max), enough to solve B for any rank up to r_max, and ``F = Σ_t (W ⊙ G_t) Ω``
(out × k), a Gaussian sketch of the importance's weighted gradient. Rows of G are processed in blocks of at most
``SKETCH_BLOCK_ELEMENTS`` entries through two reused fp32 buffers: the temporaries stay small next to the gradient,
and no fresh large allocation per hook fragments the CPU heap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SKETCH_BLOCK_ELEMENTS = 1 << 22
"""Largest fp32 temporary of the sketch hook (16 MiB): rows of G are projected in blocks of this many entries."""


@dataclass
class SketchOperators:
    """Per-layer fixed matrices of the sketch path, on the accumulation device, fp32."""

    a_max_t: Tensor  # A_maxᵀ, (in, r_max)
    omega: Tensor  # (in, k), standard Gaussian


def sketch_add_(proj: Tensor, frob: Tensor, ops: SketchOperators, weight: Tensor, grad: Tensor, inv_scale: float,
                buffer: Callable[[int, int], Tensor]) -> None:
    """``proj += inv_scale · G A_maxᵀ`` and ``frob += inv_scale · (W ⊙ G) Ω`` in fp32, over row blocks of G.

    Args:
        proj, frob: the layer's running sums, (out, r_max) and (out, k), fp32, on the operators' device.
        weight, grad: W and G, (out, in), any float dtype and device.
        buffer: ``buffer(slot, entries)`` gives a reused flat fp32 tensor of at least ``entries`` entries on the
            operators' device (slot 0: G converted to fp32; slot 1: W ⊙ G).
    """
    device = ops.a_max_t.device
    out_features, in_features = grad.shape
    rows = max(1, SKETCH_BLOCK_ELEMENTS // max(in_features, 1))
    as_is = grad.dtype == torch.float32 and grad.device == device and inv_scale == 1.0
    for start in range(0, out_features, rows):
        block = slice(start, start + rows)
        shape = (min(rows, out_features - start), in_features)
        if as_is:
            g = grad[block]  # a view: no copy
        else:
            g = _view(buffer(0, SKETCH_BLOCK_ELEMENTS), shape).copy_(grad[block])  # fp32, exact for bf16/fp16
            if inv_scale != 1.0:
                g.mul_(inv_scale)
        proj[block].addmm_(g, ops.a_max_t)
        weighted = torch.mul(g, weight[block].to(device), out=_view(buffer(1, SKETCH_BLOCK_ELEMENTS), shape))  # W ⊙ G
        frob[block].addmm_(weighted, ops.omega)


def _view(flat: Tensor, shape: tuple[int, int]) -> Tensor:
    return flat[: shape[0] * shape[1]].view(shape)
