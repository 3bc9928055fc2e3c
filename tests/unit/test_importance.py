import math

import pytest
import torch

from gora.importance import (
    frobenius_from_sketch,
    importance_frobenius,
    importance_grad_nuclear,
    importance_mean_abs,
    normalise,
)


def test_mean_abs_matches_hand_computation():
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    grad = torch.tensor([[0.5, 0.5], [-1.0, 0.0]])
    assert importance_mean_abs(weight, grad) == pytest.approx((0.5 + 1.0 + 3.0 + 0.0) / 4)
    assert importance_frobenius(weight, grad) == pytest.approx(math.sqrt(0.25 + 1 + 9))


def test_grad_nuclear_is_sum_of_singular_values():
    grad = torch.diag(torch.tensor([3.0, -2.0, 1.0]))
    assert importance_grad_nuclear(torch.zeros(3, 3), grad) == pytest.approx(6.0)


def test_bf16_inputs_are_scored_in_fp32():
    weight = torch.full((4, 4), 1.0 + 2**-9).bfloat16()
    grad = torch.ones(4, 4).bfloat16()
    assert isinstance(importance_mean_abs(weight, grad), float)


def test_normalise_sums_to_one_and_ignores_dict_order():
    scores = {"b": 2.0, "a": 1.0, "c": 1.0}
    shares = normalise(scores)
    assert math.fsum(shares.values()) == pytest.approx(1.0)
    assert shares == normalise(dict(sorted(scores.items())))
    assert shares["b"] == pytest.approx(0.5)


def test_sketched_frobenius_is_unbiased():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 200, generator=generator)
    estimates = [frobenius_from_sketch(matrix @ torch.randn(200, 32, generator=generator)) ** 2 for _ in range(200)]
    exact = torch.linalg.vector_norm(matrix).item() ** 2
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.03)
