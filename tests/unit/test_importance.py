import math

import pytest
import torch

from gora.importance import (
    SCORE_FNS,
    frobenius_from_sketch,
    importance_frobenius,
    importance_grad_nuclear,
    importance_mean_abs,
    mean_abs_score,
    normalise,
    score_consuming_,
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
    # 1 + 2^-7 is a bf16 value (8 significant bits); its square 1 + 2^-6 + 2^-14 needs 15 bits: exact in fp32
    # (24 bits hold the product of any two bf16 values), rounded to 1 + 2^-6 in bf16.
    weight = torch.full((4, 4), 1.0 + 2**-7).bfloat16()
    grad = weight.clone()
    assert torch.equal(weight.float(), torch.full((4, 4), 1.0 + 2**-7))  # the inputs are what they say
    assert importance_mean_abs(weight, grad) == 1.0 + 2**-6 + 2**-14
    assert (weight * grad).abs().float().mean().item() == 1.0 + 2**-6  # what a bf16 product would give
    # random bf16 values: the score is the fp32 score of the same values, not the score of a bf16 product
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 24, generator=generator).bfloat16()
    grad = (torch.randn(32, 24, generator=generator) * 1e-3).bfloat16()
    expected = mean_abs_score(weight.float(), grad.float())
    assert torch.equal(mean_abs_score(weight, grad), expected)
    assert importance_mean_abs(weight, grad) == expected.item()
    in_bf16 = (weight * grad).abs().float().mean()
    assert in_bf16.item() != expected.item()  # bf16 rounding of the products shows in the mean


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


@pytest.mark.parametrize("importance", sorted(SCORE_FNS))
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_score_in_the_gradient_memory_equals_the_score(importance, weight_dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=generator).to(weight_dtype)
    grad = torch.randn(48, 40, generator=generator) * 1e-3
    expected = SCORE_FNS[importance](weight, grad)
    scratch = grad.clone()
    assert torch.equal(score_consuming_(importance, weight, scratch), expected)  # bit-identical
    if importance == "grad_nuclear":  # needs Ḡ itself: computed aside, Ḡ untouched
        assert torch.equal(scratch, grad)
    else:  # the product (or its absolute value) was formed in Ḡ's memory
        assert torch.equal(scratch.abs(), (grad * weight.float()).abs())


def test_score_of_a_low_precision_gradient_leaves_it_alone():
    weight, grad = torch.randn(8, 8), torch.randn(8, 8).bfloat16()
    kept = grad.clone()
    assert score_consuming_("mean_abs", weight, grad) == SCORE_FNS["mean_abs"](weight, grad)
    assert torch.equal(grad, kept)
