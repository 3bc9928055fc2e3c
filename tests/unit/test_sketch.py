"""The sketch path: B is exact for any r_i <= r_max, and Frobenius importance is close."""

import pytest
import torch
from peft import LoraConfig

from gora import GoraConfig, GoraConfigError, estimate_gora

from conftest import make_bert_batches

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])


def test_sketch_gives_the_same_a_and_c_as_full_at_equal_ranks(tiny_bert):
    batches = make_bert_batches(4)
    fixed = dict(num_steps=4, min_rank=3, max_rank=3, importance="frobenius", show_progress=False)
    full = estimate_gora(tiny_bert, LORA, batches, GoraConfig(**fixed))
    sketch = estimate_gora(tiny_bert, LORA, batches, GoraConfig(estimator="sketch", **fixed))
    assert sketch.ranks == full.ranks
    for name in full.adapted:
        assert torch.equal(sketch.A[name], full.A[name])
        torch.testing.assert_close(sketch.C[name], full.C[name], rtol=1e-4, atol=1e-6)


def test_sketched_frobenius_importance_is_close_to_exact(tiny_bert):
    batches = make_bert_batches(4)
    full = estimate_gora(tiny_bert, LORA, batches, GoraConfig(num_steps=4, importance="frobenius", show_progress=False))
    sketch = estimate_gora(tiny_bert, LORA, batches, GoraConfig(num_steps=4, importance="frobenius", estimator="sketch",
                                                                sketch_dim=64, show_progress=False))
    for name, exact in full.importance.items():
        assert sketch.importance[name] == pytest.approx(exact, rel=0.5)


def test_sketch_requires_frobenius_importance():
    with pytest.raises(GoraConfigError, match="frobenius"):
        GoraConfig(estimator="sketch")
