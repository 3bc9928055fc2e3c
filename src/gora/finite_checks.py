"""``FiniteChecks``: NaN/Inf checks of each step's gradients, read with at most one device sync per step.

A hook does not read its gradient back to the host (on a GPU each read is a sync that stalls the queue). It hands
over a *probe* instead: a device tensor that holds a NaN/Inf exactly when the layer's gradient had one (the layer's
running sum, or the gradient's sum where the sum lives elsewhere). At the end of a step all probes are checked at
once (:meth:`FiniteChecks.end_step`), or their flags stay on the device, to be read together with later steps'
(:meth:`FiniteChecks.defer_step`, :meth:`FiniteChecks.first_failure`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def probe_flags(probes: list[Tensor]) -> Tensor:
    """A bool per probe: has it no NaN/Inf? One multi-tensor L1 norm over all of them (a few kernels in all, not
    one per tensor); NaN and Inf reach the norm from any entry."""
    return torch.isfinite(torch.stack(torch._foreach_norm(probes, 1)))


class FiniteChecks:
    """The probes of the step under way, the layers already found non-finite in it, and the deferred steps' flags."""

    def __init__(self) -> None:
        self.probes: list[tuple[str, Tensor]] = []  # (layer, a device tensor that has a NaN/Inf iff its gradient had)
        self.nonfinite: list[str] = []  # layers found non-finite in this step (fp16 checks each gradient at once)
        self._deferred: list[tuple[int, list[str], Tensor, Any]] = []  # (step, layers, flags, payload)

    def begin_step(self) -> None:
        self.probes = []
        self.nonfinite = []

    def add_probe(self, name: str, probe: Tensor) -> None:
        self.probes.append((name, probe))

    def _step_flags(self, extra_flags: list[Tensor]) -> Tensor:
        """One bool vector on the device: every probed layer's "finite?", then ``extra_flags``.

        See :func:`probe_flags`. Where the running sums are the probes, a sum holds a NaN/Inf from the first step
        whose gradient had one, so the first failing step and its layers are named as exactly.
        """
        parts = [probe_flags([probe for _, probe in self.probes])] if self.probes else []
        if extra_flags:
            parts.append(torch.stack([flag.reshape(()) for flag in extra_flags]))
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool)

    def end_step(self, extra_flags: list[Tensor]) -> tuple[list[str], list[bool]]:
        """(layers whose gradient was NaN/Inf in this step, the values of ``extra_flags``): one device sync at most."""
        values = self._step_flags(extra_flags).tolist()
        layer_values, extra_values = values[:len(self.probes)], values[len(self.probes):]
        self.nonfinite += [name for (name, _), ok in zip(self.probes, layer_values) if not ok]
        return sorted(set(self.nonfinite)), [bool(v) for v in extra_values]

    def defer_step(self, step: int, extra_flags: list[Tensor], payload: Any = None) -> None:
        """End a step without a device sync: its flags stay on the device until :meth:`first_failure`."""
        names = [name for name, _ in self.probes]
        self._deferred.append((step, names, self._step_flags(extra_flags), payload))

    def first_failure(self) -> tuple[int, list[str], list[bool], Any] | None:
        """(step, non-finite layers, extra flag values, payload) of the first deferred step with a NaN/Inf, or
        None; all deferred flags are read with one device sync and then forgotten."""
        if not self._deferred:
            return None
        values = torch.cat([flags.reshape(-1) for _, _, flags, _ in self._deferred]).tolist()
        deferred, self._deferred, offset = self._deferred, [], 0
        for step, names, flags, payload in deferred:
            step_values = values[offset : offset + flags.numel()]
            offset += flags.numel()
            if not all(step_values):
                layer_values, extra_values = step_values[: len(names)], step_values[len(names) :]
                bad = sorted({name for name, ok in zip(names, layer_values) if not ok})
                return step, bad, [bool(v) for v in extra_values], payload
        return None
