"""Numeric paths no other test reaches: an fp16 redo after a partial overflow, the sketch estimator on
low-precision models, and C against the mean gradient for layers whose rank is below the largest one drawn.

Every expectation is computed independently of gora: plain fp32 autograd for the mean gradient, and the
least-squares formula C = Ḡ Aᵀ (A Aᵀ)⁻¹ in float64.
"""

import copy

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, estimate_gora

from conftest import make_bert_batches

BERT_LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])


def _least_squares_c(g_bar: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """C = Ḡ Aᵀ (A Aᵀ)⁻¹ in float64: Ḡ (out × in), A (r × in) -> C (out × r)."""
    g, a = g_bar.double(), a.double()
    return g @ a.t() @ torch.linalg.inv(a @ a.t())


def _mean_gradients(model: nn.Module, names: list[str], batches, loss_fn) -> dict[str, torch.Tensor]:
    """Ḡ of each named Linear's weight by plain autograd: the mean over batches of d loss / d W (out × in), fp32."""
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in names}
    totals = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    for batch in batches:
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            totals[name] += grad.float()
    return {name: total / len(batches) for name, total in totals.items()}


# -- 1. fp16: a redo after an overflow in only some layers --------------------------------------------------
def _fp16_two_layer_model() -> nn.Sequential:
    """[0] 4→4 with tiny weights, [1] 4→1 with unit weights: d loss/d W[0] = scale · x (80 per entry) overflows fp16
    at a loss scale of 1024 (81920 > 65504) but not at 512 (40960); d loss/d W[1] = scale · h stays small."""
    with torch.random.fork_rng(devices=[]):  # seeded biases; the global generator is left as it was
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e-3)  # type: ignore[operator]  # nn.Sequential's items are modules
        model[1].weight.fill_(1.0)  # type: ignore[operator]
    return model.half().eval()


def _sum_loss(model, batch):
    return model(batch).sum()


def test_fp16_partial_overflow_redo_adds_each_layer_once_and_matches_fp32_autograd():
    model = _fp16_two_layer_model()
    batches = [torch.full((1, 4), 80.0).half(), torch.full((1, 4), 50.0).half()]

    # the premise: at scale 1024 only layer 0 overflows, and layer 1's gradient is finite (it is added before the
    # redo, whichever hook runs first, so a redo that does not skip it would count it twice)
    probe = copy.deepcopy(model)
    (_sum_loss(probe, batches[0]) * 1024).backward()
    assert not torch.isfinite(probe[0].weight.grad).any()
    assert torch.isfinite(probe[1].weight.grad).all()
    probe.zero_grad(set_to_none=True)
    (_sum_loss(probe, batches[0]) * 512).backward()
    assert torch.isfinite(probe[0].weight.grad).all()

    reference_model = copy.deepcopy(model).float()  # the same (fp16-rounded) weights, in fp32
    g_bar = _mean_gradients(reference_model, ["0", "1"], [b.float() for b in batches], _sum_loss)

    config = GoraConfig(num_steps=2, min_rank=4, max_rank=4, show_progress=False)  # ranks 4 and 1 (= min(out, in))
    state = estimate_gora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"]), batches, config,
                          loss_fn=_sum_loss)

    assert state.notes["fp16_final_loss_scale"] == 512
    assert state.ranks == {"0": 4, "1": 1}
    for name in ("0", "1"):
        expected_c = _least_squares_c(g_bar[name], state.A[name]).float()
        torch.testing.assert_close(state.C[name], expected_c, rtol=5e-3, atol=1e-4 * expected_c.abs().max().item())
        weight = reference_model.get_submodule(name).weight
        expected_importance = (weight * g_bar[name]).abs().mean().item()  # mean_abs, the default score
        assert state.importance[name] == pytest.approx(expected_importance, rel=5e-3)


# -- 2. the sketch estimator on fp16 and bf16 models --------------------------------------------------------
@pytest.fixture(scope="module")
def sketch_fp32_run():
    from transformers import BertForSequenceClassification

    from conftest import _bert_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(_bert_config()).eval()
    batches = make_bert_batches(2)
    config = GoraConfig(num_steps=2, estimator="sketch", importance="frobenius", show_progress=False)
    return model, batches, config, estimate_gora(model, BERT_LORA, batches, config)


@pytest.mark.parametrize("dtype, norm_tolerance, min_cosine", [(torch.float16, 0.02, 0.999),
                                                               (torch.bfloat16, 0.05, 0.99)])
def test_sketch_on_low_precision_models_matches_the_fp32_sketch(sketch_fp32_run, dtype, norm_tolerance, min_cosine):
    model, batches, config, reference = sketch_fp32_run
    state = estimate_gora(copy.deepcopy(model).to(dtype), BERT_LORA, batches, config)

    assert state.ranks == reference.ranks
    if dtype == torch.float16:
        assert state.notes["fp16_final_loss_scale"] == config.fp16_loss_scale  # the loss really was scaled
    for name in reference.adapted:
        assert torch.equal(state.A[name], reference.A[name])  # same seeded draw: C is directly comparable
        c, c_ref = state.C[name].double(), reference.C[name].double()
        assert c.norm().item() == pytest.approx(c_ref.norm().item(), rel=norm_tolerance), name
        cosine = torch.nn.functional.cosine_similarity(c.flatten(), c_ref.flatten(), dim=0).item()
        assert cosine > min_cosine, name
        assert state.importance[name] == pytest.approx(reference.importance[name], rel=norm_tolerance), name


# -- 3. end to end: C against Ḡ for ranks below the largest rank drawn ---------------------------------------
@pytest.mark.parametrize("estimator", ["full", "sketch"])
def test_c_is_the_least_squares_fit_of_the_autograd_mean_gradient_below_max_rank(tiny_bert, estimator):
    batches = make_bert_batches(2)
    config = GoraConfig(num_steps=2, estimator=estimator, importance="frobenius", show_progress=False)
    state = estimate_gora(tiny_bert, BERT_LORA, batches, config)

    _, max_rank = config.rank_bounds(BERT_LORA.r)
    drawn = {n: min(max_rank, *state.shapes[n]) for n in state.adapted}  # rows of A_max per layer
    below = [n for n in state.adapted if state.ranks[n] < drawn[n]]
    assert below, f"every layer got its largest rank {state.ranks}: the test would not reach ranks below it"

    def default_loss(model, batch):
        return model(**batch).loss

    assert not tiny_bert.training  # estimation keeps eval mode: no dropout in either computation
    g_bar = _mean_gradients(tiny_bert, state.adapted, batches, default_loss)
    for name in state.adapted:
        a = state.A[name]
        out_features, in_features = state.shapes[name]
        assert a.shape == (state.ranks[name], in_features)
        expected = _least_squares_c(g_bar[name], a).float()
        assert state.C[name].shape == (out_features, state.ranks[name])
        scale = expected.abs().max().item()
        torch.testing.assert_close(state.C[name], expected, rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
