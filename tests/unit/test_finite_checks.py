"""FiniteChecks names the first step with a NaN/Inf and its layers, from probes read all at once."""

import math

import pytest
import torch

from gora.finite_checks import FiniteChecks, probe_flags


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_probe_flags_finds_a_nan_or_inf_in_any_entry(bad):
    probes = [torch.zeros(3, 4), torch.ones(5), torch.zeros(2, 2)]
    probes[1][3] = bad
    assert probe_flags(probes).tolist() == [True, False, True]


def test_end_step_names_the_non_finite_layers_and_returns_the_extra_flags():
    checks = FiniteChecks()
    checks.begin_step()
    checks.add_probe("a", torch.ones(2))
    checks.add_probe("b", torch.tensor([1.0, math.nan]))
    checks.nonfinite.append("c")  # found by a per-gradient check in this step
    bad, extra = checks.end_step([torch.tensor(True), torch.tensor(False)])
    assert bad == ["b", "c"] and extra == [True, False]
    checks.begin_step()  # a new step starts clean
    assert checks.end_step([]) == ([], [])


def test_deferred_steps_report_the_first_failure_once_then_forget_it():
    checks = FiniteChecks()
    for step, (a, b, loss_ok) in enumerate([(1.0, 1.0, True), (1.0, math.inf, True), (math.nan, 1.0, False)]):
        checks.begin_step()
        checks.add_probe("a", torch.tensor([a]))
        checks.add_probe("b", torch.tensor([b]))
        checks.defer_step(step, [torch.tensor(loss_ok)], payload=f"loss {step}")
    assert checks.first_failure() == (1, ["b"], [True], "loss 1")
    assert checks.first_failure() is None  # read once: the flags are gone


def test_a_step_without_probes_still_reports_its_extra_flags():
    checks = FiniteChecks()
    checks.begin_step()
    checks.defer_step(0, [torch.tensor(False)])
    assert checks.first_failure() == (0, [], [False], None)
