"""Streamed accumulation equals plain autograd, for every layer, the last-computed one included."""


import torch
from peft import LoraConfig

from gora import GoraConfig
from gora.devices import accumulation_device
from gora.estimation import run_estimation
from gora.targets import resolve_targets

from conftest import make_bert_batches, make_lm_batches, tiny_gpt2


def _autograd_mean_grads(model, targets, batches):
    """(1/N) Σ_t ∇L_t by plain autograd, (out, in) orientation."""
    grads = {t.name: torch.zeros(t.shape, dtype=torch.float64) for t in targets}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for t in targets:
            g = t.weight.grad.t() if t.transposed else t.weight.grad
            grads[t.name] += g.double() / len(batches)
    model.zero_grad(set_to_none=True)
    return grads


def _estimate(model, lora_config, batches, **config):
    targets, _ = resolve_targets(model, lora_config)
    config = GoraConfig(num_steps=len(batches), show_progress=False, **config)
    device = accumulation_device(targets, torch.device("cpu"), config)
    run = run_estimation(model, targets, iter(batches), config, None, None, device)
    return targets, run


def test_accumulation_equals_full_batch_autograd(tiny_bert):
    lora_config = LoraConfig(r=4, target_modules=["query", "key", "value", "dense"])
    batches = make_bert_batches(5)
    targets, run = _estimate(tiny_bert, lora_config, batches)
    expected = _autograd_mean_grads(tiny_bert, targets, batches)
    for t in targets:
        sums = run.sums[t.name]
        assert sums.grad.dtype == torch.float32
        torch.testing.assert_close(sums.grad.double() / sums.count, expected[t.name], rtol=1e-5, atol=1e-8)


def test_every_counter_equals_steps_including_last_computed_layer(tiny_bert):
    # the classifier-side pooler is the first layer backward reaches, the embeddings-side query the last
    lora_config = LoraConfig(r=4, target_modules=["query", "pooler.dense"])
    targets, run = _estimate(tiny_bert, lora_config, make_bert_batches(6))
    assert {run.sums[t.name].count for t in targets} == {6}
    assert run.steps == 6 and run.samples == 24


def test_conv1d_gradients_are_transposed_to_out_in():
    model = tiny_gpt2()
    lora_config = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    batches = make_lm_batches(3)
    targets, run = _estimate(model, lora_config, batches)
    c_attn = next(t for t in targets if t.name.endswith("attn.c_attn"))
    assert c_attn.transposed and c_attn.shape == (96, 32)
    assert run.sums[c_attn.name].grad.shape == (96, 32)
    expected = _autograd_mean_grads(model, targets, batches)
    for t in targets:
        torch.testing.assert_close(run.sums[t.name].grad.double() / 3, expected[t.name], rtol=1e-5, atol=1e-8)


def test_layers_without_gradient_get_count_zero(tiny_bert):
    # pooler output is unused when the loss only reads hidden states
    lora_config = LoraConfig(r=4, target_modules=["query", "pooler.dense"])
    targets, _ = resolve_targets(tiny_bert, lora_config)
    config = GoraConfig(num_steps=2, show_progress=False)

    def loss_fn(model, batch):
        return model.bert(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()

    run = run_estimation(tiny_bert, targets, iter(make_bert_batches(2)), config, loss_fn, None, torch.device("cpu"))
    assert run.sums["bert.pooler.dense"].count == 0
    assert run.sums["bert.encoder.layer.0.attention.self.query"].count == 2
    assert all(p.grad is None for p in tiny_bert.parameters())


def _halves(batch):
    return ({k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()})


def test_a_step_with_two_backward_calls_counts_once_and_adds_both(tiny_bert, monkeypatch):
    """loss_fn may run backward itself (e.g. on half of the batch) and return the rest: the step's gradient is the
    sum of both, divided by N steps, not by 2N hook firings. With every gradient held for one multi-tensor add, a
    sum must not appear twice in one call (on a GPU its two updates could race)."""
    from gora import accumulate

    monkeypatch.setattr(accumulate, "CPU_BATCH_ADD_BYTES", 1 << 30)  # hold everything until the step ends
    calls = []
    original = torch._foreach_add_

    def unique_sums(totals, grads):
        calls.append(len(totals))
        assert len({id(t) for t in totals}) == len(totals), "one sum twice in one multi-tensor add"
        return original(totals, grads)

    monkeypatch.setattr(accumulate.torch, "_foreach_add_", unique_sums)
    lora_config = LoraConfig(r=4, target_modules=["query", "value"])
    batches = make_bert_batches(3)

    def loss_fn(model, batch):
        first, second = _halves(batch)
        model(**first).loss.backward()
        return model(**second).loss

    targets, _ = resolve_targets(tiny_bert, lora_config)
    config = GoraConfig(num_steps=3, show_progress=False)
    run = run_estimation(tiny_bert, targets, iter(batches), config, loss_fn, None, torch.device("cpu"))
    assert calls and {run.sums[t.name].count for t in targets} == {3}
    expected = {t.name: torch.zeros(t.shape, dtype=torch.float64) for t in targets}
    for batch in batches:
        for half in _halves(batch):
            tiny_bert.zero_grad(set_to_none=True)
            tiny_bert(**half).loss.backward()
            for t in targets:
                expected[t.name] += t.weight.grad.double() / 3
    tiny_bert.zero_grad(set_to_none=True)
    for t in targets:
        torch.testing.assert_close(run.sums[t.name].grad.double() / run.sums[t.name].count, expected[t.name],
                                   rtol=1e-5, atol=1e-8)


def test_a_layer_reused_in_two_checkpointed_segments_counts_each_step_once():
    """Reentrant checkpoints run a backward per segment, so a layer used in two segments gets two hook calls per
    step: its mean gradient must still be Σ_t ∇L_t / N."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            x = x.requires_grad_()  # reentrant checkpointing needs an input that requires grad
            y = checkpoint(self.shared, x, use_reentrant=True).tanh()
            y = checkpoint(self.shared, y, use_reentrant=True).tanh()
            return self.head(y).pow(2).mean()

    torch.manual_seed(0)
    model = Twice()
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    targets, _ = resolve_targets(model, LoraConfig(r=2, target_modules=["shared", "head"]))
    config = GoraConfig(num_steps=3, show_progress=False)
    run = run_estimation(model, targets, iter(batches), config, lambda m, b: m(b.clone()), None, torch.device("cpu"))
    for t in targets:
        reference = torch.zeros(t.shape, dtype=torch.float64)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(batch.clone()).backward()
            reference += t.weight.grad.double() / 3
        assert run.sums[t.name].count == 3, t.name
        torch.testing.assert_close(run.sums[t.name].grad.double() / 3, reference, rtol=1e-5, atol=1e-8)


def test_summary_lists_a_layer_without_gradient_once_with_its_reason(tiny_bert):
    from gora import estimate_gora

    def loss_fn(model, batch):  # the pooler's output is never used: its layer gets no gradient
        return model.bert(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()

    state = estimate_gora(tiny_bert, LoraConfig(r=4, target_modules=["query", "pooler.dense"]), make_bert_batches(2),
                          gora_config=GoraConfig(num_steps=2, show_progress=False), loss_fn=loss_fn)
    rows = [row for row in state.summary().splitlines() if row.startswith("bert.pooler.dense ")]
    assert state.ranks["bert.pooler.dense"] == 0 and state.skipped["bert.pooler.dense"] == "no gradient"
    assert len(rows) == 1 and "skipped: no gradient" in rows[0]
