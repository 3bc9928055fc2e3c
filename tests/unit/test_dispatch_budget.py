"""Estimation adds few tensor operations per step on top of plain forward+backward passes.

On a GPU every operation is a kernel launch, and a small model's step is bound by launches: each one a hook adds
per layer costs time in every step. The operations are counted here on the CPU, where the code paths are the same,
with a ``TorchDispatchMode`` (every aten call, as the device would see it).
"""

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode

from gora import accumulate
from gora.accumulate import GradientAccumulator
from gora.targets import resolve_targets

from conftest import make_bert_batches

TARGETS = ["query", "key", "value", "dense"]


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_per_step(model, batch, with_accumulator: bool, steps: int = 2) -> tuple[int, int]:
    """aten calls of the last of ``steps`` steps (the first step of the accumulator makes the sums)."""
    targets, _ = resolve_targets(model, LoraConfig(r=2, target_modules=TARGETS))
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        t.weight.requires_grad_(True)
    if not with_accumulator:
        for _ in range(steps):
            with CountOps() as counter:
                model(**batch).loss.backward()
            for t in targets:
                t.weight.grad = None
        return len(counter.ops), len(targets)
    with GradientAccumulator(model, targets, torch.device("cpu")) as accumulator:
        for step in range(steps):
            with CountOps() as counter:
                accumulator.begin_step()
                loss = model(**batch).loss
                loss.backward()
                accumulator.defer_step(step, [torch.isfinite(loss.detach()).reshape(())], payload=loss)
        assert accumulator.first_failure() is None
    return len(counter.ops), len(targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_add_per_layer_and_a_constant_per_step(tiny_bert, dtype, monkeypatch):
    # count what a step on an accelerator issues: its batch budget for the adds, not the CPU's smaller one
    monkeypatch.setattr(accumulate, "CPU_BATCH_ADD_BYTES", accumulate.BATCH_ADD_BYTES)
    model = tiny_bert.to(dtype)
    batch = make_bert_batches(1)[0]
    floor, layers = _ops_per_step(model, batch, with_accumulator=False)
    with_gora, _ = _ops_per_step(model, batch, with_accumulator=True)
    extra = with_gora - floor
    # per layer: nothing in fp32 (the adds of small gradients are batched into one multi-tensor add per step); bf16
    # on the CPU: a block copy into the fp32 workspace, then the add, and views. Per step: the batched add, one
    # multi-tensor norm of the sums, two isfinite (4 ops each), stacking the flags
    per_layer = 0 if dtype == torch.float32 else 6
    assert extra <= per_layer * layers + 16, (extra, layers)
