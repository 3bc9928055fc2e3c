"""Scoring after accumulation reads device values on the host a fixed number of times, not once per layer.

On CUDA every host read (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ...) is a device sync; the
reads are counted here on the CPU, where the code paths are the same.
"""

import functools

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora.accumulate import LayerSums
from gora.api import _score_and_project
from gora.config import GoraConfig
from gora.estimation import _running_importance
from gora.importance import IMPORTANCE_FNS, frobenius_from_sketch
from gora.initialization import draw_a
from gora.targets import resolve_targets

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(6, 5)}) for _ in range(layers))


def _layers(count: int, estimator: str):
    torch.manual_seed(count)
    targets, _ = resolve_targets(Stack(count), LoraConfig(r=2, target_modules=["proj"]))
    a_max = {t.name: draw_a(0, t.name, 4, t.in_features) for t in targets}
    if estimator == "full":
        sums = {t.name: LayerSums(count=3, grad=torch.randn(5, 6)) for t in targets}
    else:
        sums = {t.name: LayerSums(count=3, proj=torch.randn(5, 4), frob=torch.randn(5, 8)) for t in targets}
    return targets, sums, a_max


def _count_host_reads(monkeypatch, call) -> int:
    calls = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        call()
    finally:
        monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("estimator,importance", [("full", "mean_abs"), ("full", "frobenius"),
                                                  ("full", "grad_nuclear"), ("sketch", "frobenius")])
def test_host_reads_do_not_grow_with_layers(monkeypatch, estimator, importance):
    config = GoraConfig(estimator=estimator, importance=importance)
    reads = {}
    for count in (2, 6):
        targets, sums, a_max = _layers(count, estimator)
        running = _count_host_reads(monkeypatch, functools.partial(_running_importance, targets, sums, config))
        final = _count_host_reads(monkeypatch, functools.partial(_score_and_project, targets, sums, a_max, config))
        reads[count] = (running, final)
    assert reads[2] == reads[6]
    assert max(reads[6]) <= 2


@pytest.mark.parametrize("estimator,importance", [("full", "mean_abs"), ("full", "frobenius"),
                                                  ("full", "grad_nuclear"), ("sketch", "frobenius")])
def test_batched_scores_equal_per_layer_floats(estimator, importance):
    config = GoraConfig(estimator=estimator, importance=importance)
    targets, sums, a_max = _layers(3, estimator)
    if estimator == "full":
        means = {n: s.grad / s.count for n, s in sums.items()}
        expected = {t.name: IMPORTANCE_FNS[importance](t.weight.detach(), means[t.name]) for t in targets}
        expected_p = {n: means[n] @ a_max[n].t() for n in means}
    else:
        expected = {n: frobenius_from_sketch(s.frob / s.count) for n, s in sums.items()}
        expected_p = {n: s.proj / s.count for n, s in sums.items()}
    assert _running_importance(targets, sums, config) == expected
    importance_values, projected = _score_and_project(targets, sums, a_max, config)
    assert importance_values == expected and list(importance_values) == [t.name for t in targets]
    assert projected.keys() == expected_p.keys()
    assert all(torch.equal(projected[n], expected_p[n]) and projected[n].device.type == "cpu" for n in expected_p)
