"""``host_add_``: the CPU fp32 sum of a low-precision gradient, block-converted, gives ``add_``'s exact values."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from gora import GoraConfig
from gora.estimation import run_estimation
from gora.host_add import host_add_
from gora.targets import resolve_targets

from conftest import make_lm_batches, tiny_gpt2, tiny_llama


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), workspace=st.integers(1, 300),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       alpha=st.sampled_from([1.0, 0.5, 1 / 3, 2.0**-20]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_host_add_equals_plain_add_bit_for_bit(rows, cols, workspace, dtype, alpha, transposed, seed):
    generator = torch.Generator().manual_seed(seed)
    total = torch.randn(rows, cols, generator=generator)
    grad = torch.randn(cols, rows, generator=generator).to(dtype).t() if transposed else \
        torch.randn(rows, cols, generator=generator).to(dtype)
    expected = total.clone().add_(grad, alpha=alpha)
    host_add_(total, grad, alpha, torch.empty(workspace))
    assert torch.equal(total, expected)


def test_host_add_touches_only_the_workspace_and_total():
    grad = torch.randn(7, 5).bfloat16()
    kept = grad.clone()
    total = torch.zeros(7, 5)
    workspace = torch.full((10,), 123.0)  # two rows per block: rows 0-1, 2-3, 4-5, 6
    host_add_(total, grad, 1.0, workspace)
    assert torch.equal(grad, kept)
    assert torch.equal(total, grad.float())
    assert torch.equal(workspace[:5], grad[6].float())  # the last block (one row) was converted last


def test_host_add_refuses_a_non_matrix():
    with pytest.raises(ValueError, match="2-D gradient"):
        host_add_(torch.zeros(3), torch.ones(3).bfloat16(), 1.0, torch.empty(4))


def _reference_sums(model, targets, batches):
    """Σ_t G_t in fp32 from plain backward passes, one per batch (what the accumulator must equal)."""
    sums = {t.name: torch.zeros(t.out_features, t.in_features) for t in targets}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for t in targets:
            grad = t.weight.grad.t() if t.transposed else t.weight.grad
            sums[t.name] += grad.float()
    model.zero_grad(set_to_none=True)
    return sums


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_cpu_bf16_model_sums_equal_fp32_sums_of_its_gradients(make_model):
    model = make_model().to(torch.bfloat16)
    batches = make_lm_batches(3)
    targets, _ = resolve_targets(model, LoraConfig(r=2, target_modules="all-linear"))
    config = GoraConfig(num_steps=3, show_progress=False)
    result = run_estimation(model, targets, iter(batches), config, None, None, torch.device("cpu"))
    reference = _reference_sums(model, targets, batches)
    for name, sums in result.sums.items():
        assert sums.grad.dtype == torch.float32 and sums.count == 3
        torch.testing.assert_close(sums.grad, reference[name], rtol=0, atol=0)
