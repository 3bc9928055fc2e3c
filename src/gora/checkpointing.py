"""``GradientCheckpointing``: the model's own gradient checkpointing during estimation, restored exactly on exit."""

from __future__ import annotations

import functools
import logging
from typing import Any

from torch import nn

from .errors import GoraUnsupportedError

logger = logging.getLogger(__name__)

_CHECKPOINT_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hooks",
                     "_require_grads_hook")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_COMPANIONS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class GradientCheckpointing:
    """Context manager: the model's own gradient checkpointing during estimation, restored exactly on exit.

    Calls ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
    (Hugging Face models). Hugging Face blocks checkpoint only while the *block* is in train mode
    (``GradientCheckpointingLayer.__call__`` tests ``self.training``), and models load in eval mode. Switching
    the block to train mode would also switch on the dropout some blocks apply themselves
    (``F.dropout(x, p=self.dropout, training=self.training)`` in BART and Whisper layers), so an eval-mode block
    is left in eval mode and its ``forward`` is checkpointed instead (non-reentrant ``torch.utils.checkpoint``,
    with the cache switched off as Hugging Face does): estimation stays deterministic and recomputation is
    exact. On exit the checkpointing attributes, the forward hooks ``enable_input_require_grads`` registers, the
    wrapped ``forward`` and the flags are put back as they were. Non-reentrant checkpointing needs no input that
    requires grad.

    Raises:
        GoraUnsupportedError: the model has no ``gradient_checkpointing_enable`` or does not support it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved_attrs: list[tuple[nn.Module, dict]] = []
        self._saved_hooks: list[tuple[nn.Module, dict[str, set]]] = []
        self._saved_modes: list[tuple[nn.Module, bool]] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (block, its own instance ``forward`` before, or None)

    def __enter__(self) -> GradientCheckpointing:
        enable = getattr(self.model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise GoraUnsupportedError(
                f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() (a transformers "
                f"PreTrainedModel); {type(self.model).__name__} has none. Set GoraConfig(gradient_checkpointing="
                "False), or checkpoint inside loss_fn with torch.utils.checkpoint."
            )
        modules = list(self.model.modules())
        self._saved_attrs = [(m, {a: m.__dict__[a] for a in _CHECKPOINT_ATTRS if a in m.__dict__}) for m in modules]
        self._saved_hooks = [(m, {d: set(getattr(m, d)) for d in _HOOK_DICTS}) for m in modules]
        self._saved_modes = [(m, m.training) for m in modules]
        try:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            switched = self._checkpoint_eval_blocks(modules)
        except BaseException as err:
            self._restore()
            if isinstance(err, ValueError):  # transformers: "... does not support gradient checkpointing"
                raise GoraUnsupportedError(f"{err} Set GoraConfig(gradient_checkpointing=False).") from err
            raise
        if not switched:
            logger.warning("gradient_checkpointing=True: %s has no checkpointing blocks that act in eval mode; "
                           "checkpointing only acts in train mode (GoraConfig(train_mode=True)).",
                           type(self.model).__name__)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _checkpoint_eval_blocks(self, modules: list[nn.Module]) -> int:
        """Checkpoint the blocks Hugging Face would checkpoint in train mode; returns how many will checkpoint."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in modules if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for block in blocks:
            if not block.training:  # in train mode Hugging Face's own __call__ checkpoints it
                self._wrapped.append((block, block.__dict__.get("forward")))
                block.forward = _checkpointed(block.forward, block._gradient_checkpointing_func)
        return len(blocks)

    def _restore(self) -> None:
        for block, forward in reversed(self._wrapped):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
        self._wrapped = []
        for module, hooks in self._saved_hooks:
            for dict_name, kept in hooks.items():
                for key in set(getattr(module, dict_name)) - kept:
                    getattr(module, dict_name).pop(key, None)
                    for companion in _HOOK_COMPANIONS:
                        getattr(module, companion, {}).pop(key, None)
        for module, attrs in self._saved_attrs:
            for name in _CHECKPOINT_ATTRS:
                if name in attrs:
                    module.__dict__[name] = attrs[name]
                elif name in module.__dict__:
                    del module.__dict__[name]
        for module, mode in self._saved_modes:
            module.training = mode
        self._saved_hooks, self._saved_attrs, self._saved_modes = [], [], []


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _checkpointed(forward, checkpoint):
    """``forward`` run through the block's own ``_gradient_checkpointing_func`` (set by
    ``gradient_checkpointing_enable``) without a cache, as ``GradientCheckpointingLayer.__call__`` does in train
    mode: a cache would be written twice, once more by the recomputation."""

    def checkpointed_forward(*args, **kwargs):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        return checkpoint(functools.partial(forward, **kwargs), *args)

    return checkpointed_forward
