"""The loss of one batch: ``loss_fn(model, batch)`` or ``model(**batch).loss``, refused with a clear error when it is
not a scalar tensor."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .errors import GoraDataError

LossFn = Callable[[nn.Module, Any], Tensor]


def forward_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """``loss_fn(model, batch)``, or ``model(**batch).loss``; a clear error when there is no scalar loss."""
    loss: Tensor | None
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise GoraDataError(
                f"a batch is a {type(batch).__name__}; the default loss is model(**batch).loss, which needs dict "
                "batches. Pass dicts (input_ids, attention_mask, labels, ...) or loss_fn=lambda model, batch: ..."
            )
        output = model(**batch)
        loss = getattr(output, "loss", None) if not isinstance(output, Mapping) else output.get("loss")
        if loss is None:
            raise GoraDataError(
                "model(**batch) returned no loss: include labels in the batches (batch['labels']) "
                "or pass loss_fn(model, batch) that returns a scalar loss."
            )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise GoraDataError(f"the loss must be a scalar tensor, got {type(loss).__name__} "
                            f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}.")
    return loss


def compute_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    loss = forward_loss(model, batch, loss_fn)
    if not loss.requires_grad:
        raise GoraDataError("the loss does not depend on any target weight (no grad_fn); "
                            "check target_modules and that loss_fn runs the model.")
    return loss


def compute_loss_no_grad(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> float:
    """The loss as a float, for evaluation (no graph is kept)."""
    return float(forward_loss(model, batch, loss_fn).detach().float())
