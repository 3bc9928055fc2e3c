"""The estimation loop's performance paths keep its numerics and its hygiene.

Gradient checkpointing during estimation, the sketch path's row blocks, the cheaper finite checks and
the CUDA offload (pinned, non-blocking copies) must give the same sums as the plain path, name the
layer and step of a NaN gradient, and leave the model exactly as it was.
"""

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, accumulate, offload
from gora.devices import accumulation_device, model_device
from gora.errors import GoraNumericalError, GoraUnsupportedError
from gora.estimation import run_estimation
from gora.initialization import draw_a, draw_omega
from gora.sketch import SketchOperators
from gora.targets import resolve_targets

from conftest import make_bert_batches, make_lm_batches, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _snapshot(model: nn.Module) -> dict:
    """Everything estimation must leave as it found: weights, flags, modes, .grad, hooks, checkpointing."""
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "post_hooks": {n: len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                       for n, p in model.named_parameters()},
        "checkpointing": {n: {a: m.__dict__[a] for a in ("gradient_checkpointing", "_gradient_checkpointing_func",
                                                          "_require_grads_hooks") if a in m.__dict__}
                          for n, m in model.named_modules()},
        "forwards": {n: m.__dict__.get("forward") for n, m in model.named_modules()},  # no wrapper left behind
    }


def _assert_restored(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    for name, weight in before["weights"].items():
        assert torch.equal(after["weights"][name], weight), name
    for key in ("flags", "modes", "hooks", "post_hooks", "checkpointing", "forwards"):
        assert after[key] == before[key], key
    for name, grad in before["grads"].items():
        assert (after["grads"][name] is None) == (grad is None), name
        if grad is not None:
            assert torch.equal(after["grads"][name], grad), name


def _run(model, target_modules, batches, loss_fn=None, sketch=False, **config):
    targets, _ = resolve_targets(model, LoraConfig(r=4, target_modules=target_modules))
    extra = {"estimator": "sketch", "importance": "frobenius"} if sketch else {}
    config = GoraConfig(num_steps=len(batches), show_progress=False, **extra, **config)
    ops = _sketch_operators(targets, config) if sketch else None
    device = accumulation_device(targets, model_device(model), config)
    return targets, run_estimation(model, targets, iter(batches), config, loss_fn, ops, device)


def _sketch_operators(targets, config, rows=8):
    return {t.name: SketchOperators(draw_a(config.seed, t.name, min(rows, t.in_features, t.out_features),
                                           t.in_features).t().contiguous(),
                                    draw_omega(config.seed, t.name, t.in_features, config.sketch_dim))
            for t in targets}


def _count_block_forwards(model: nn.Module) -> tuple[list[int], object]:
    """Calls into the first decoder block's MLP: 2 per step when the block is recomputed in backward.

    A pre-hook: non-reentrant recomputation stops early, once the last saved tensor is rebuilt (inside the MLP).
    """
    calls = [0]
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    handle = mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


# -- gradient checkpointing ---------------------------------------------------------------------
@pytest.mark.slow  # recomputes every block of a Llama
def test_gradient_checkpointing_gives_same_mean_gradient_and_restores_llama():
    model = tiny_llama()
    batches = make_lm_batches(3)
    _, plain = _run(model, LLAMA_TARGETS, batches)
    before = _snapshot(model)
    calls, handle = _count_block_forwards(model)
    _, checkpointed = _run(model, LLAMA_TARGETS, batches, gradient_checkpointing=True)
    handle.remove()
    assert calls[0] == 2 * len(batches)  # eval-mode model, yet every block was recomputed in backward
    for name, sums in plain.sums.items():
        assert checkpointed.sums[name].count == sums.count == len(batches)
        torch.testing.assert_close(checkpointed.sums[name].grad, sums.grad, rtol=1e-5, atol=1e-7)
    _assert_restored(model, before)
    assert not model.is_gradient_checkpointing and not model.training


def test_gradient_checkpointing_keeps_dropout_off_in_eval_mode(tiny_bert):
    # BERT has dropout 0.1: only the checkpointed blocks' own flag is switched, so estimation stays deterministic
    batches = make_bert_batches(2)
    targets = ["query", "key", "value", "dense"]
    calls = [0]
    intermediate = tiny_bert.bert.encoder.layer[0].intermediate
    handle = intermediate.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    _, plain = _run(tiny_bert, targets, batches)
    handle.remove()
    assert calls[0] == len(batches)  # one forward per step without checkpointing
    calls[0] = 0
    before = _snapshot(tiny_bert)
    handle = intermediate.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    _, checkpointed = _run(tiny_bert, targets, batches, gradient_checkpointing=True)
    handle.remove()
    assert calls[0] == 2 * len(batches)  # eval-mode model, yet the block was recomputed in backward
    for name, sums in plain.sums.items():
        torch.testing.assert_close(checkpointed.sums[name].grad, sums.grad, rtol=1e-5, atol=1e-7)
    _assert_restored(tiny_bert, before)


def test_gradient_checkpointing_keeps_block_level_dropout_off_in_eval_mode():
    """BART layers call F.dropout(x, p=self.dropout, training=self.training) themselves: a block switched to train
    mode would drop activations at random. Eval-mode blocks are checkpointed without a mode change."""
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                        dropout=0.5, activation_dropout=0.5, num_labels=2, pad_token_id=1, eos_token_id=2)
    model = BartForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 64, (2, 8), generator=generator)
        ids[:, -1] = 2  # one eos per row: the classification head reads it
        batches.append({"input_ids": ids, "labels": torch.tensor([0, 1])})
    targets = ["q_proj", "v_proj", "fc1"]
    _, plain = _run(model, targets, batches)
    before = _snapshot(model)
    calls = [0]
    layer = model.model.encoder.layers[0]
    handle = layer.fc1.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    _, checkpointed = _run(model, targets, batches, gradient_checkpointing=True)
    handle.remove()
    assert calls[0] == 2 * len(batches)  # recomputed in backward: checkpointing did act
    for name, sums in plain.sums.items():
        torch.testing.assert_close(checkpointed.sums[name].grad, sums.grad, rtol=1e-5, atol=1e-7)
    _assert_restored(model, before)


def test_gradient_checkpointing_in_train_mode_is_restored_to_eval():
    model = tiny_llama()
    before = _snapshot(model)
    calls, handle = _count_block_forwards(model)
    _run(model, LLAMA_TARGETS, make_lm_batches(2), gradient_checkpointing=True, train_mode=True)
    handle.remove()
    assert calls[0] == 4
    _assert_restored(model, before)


def test_user_enabled_checkpointing_is_left_as_it_was():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    before = _snapshot(model)
    _run(model, LLAMA_TARGETS, make_lm_batches(2), gradient_checkpointing=True)
    _assert_restored(model, before)  # the user's reentrant function and input-grad hook are back


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_checkpointing_and_model_restored_after_error(error):
    model = tiny_llama()
    before = _snapshot(model)
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == 2:
            raise error
        return model(**batch).loss

    match = "boom" if isinstance(error, RuntimeError) else None  # the injected error, not another one
    with pytest.raises(type(error), match=match) as raised:
        _run(model, LLAMA_TARGETS, make_lm_batches(3), loss_fn=loss_fn, gradient_checkpointing=True)
    assert raised.value is error
    assert calls[0] == 2  # the first checkpointed step ran; the error came from the second call, as injected
    _assert_restored(model, before)


def test_checkpointing_on_a_plain_torch_model_is_refused_and_restores():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    before = _snapshot(model)

    def loss_fn(model, batch):
        return model(batch).pow(2).mean()

    with pytest.raises(GoraUnsupportedError, match="gradient_checkpointing_enable"):
        _run(model, ["0", "1"], [torch.randn(2, 4)], loss_fn=loss_fn, gradient_checkpointing=True)
    _assert_restored(model, before)


# -- sketch path ---------------------------------------------------------------------------------
def test_sketch_row_blocks_equal_one_block_and_full_projection(monkeypatch):
    model = tiny_llama()
    batches = make_lm_batches(3)
    targets, full = _run(model, LLAMA_TARGETS, batches)
    _, one_block = _run(model, LLAMA_TARGETS, batches, sketch=True)
    monkeypatch.setattr("gora.sketch.SKETCH_BLOCK_ELEMENTS", 100)  # a few rows per block
    before = _snapshot(model)
    _, blocks = _run(model, LLAMA_TARGETS, batches, sketch=True)
    _assert_restored(model, before)
    ops = _sketch_operators(targets, GoraConfig())
    for target in targets:
        name = target.name
        assert blocks.sums[name].grad is None and blocks.sums[name].count == 3
        torch.testing.assert_close(blocks.sums[name].proj, one_block.sums[name].proj, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(blocks.sums[name].frob, one_block.sums[name].frob, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(blocks.sums[name].proj, full.sums[name].grad @ ops[name].a_max_t,
                                   rtol=1e-4, atol=1e-6)
        w_g = target.weight_out_in().detach() * full.sums[name].grad
        torch.testing.assert_close(blocks.sums[name].frob, w_g @ ops[name].omega, rtol=1e-4, atol=1e-6)


# -- batched adds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 2000, 1 << 30])  # every gradient at once / a few per add / all per step
def test_batched_adds_give_the_sums_of_one_add_per_hook_bit_for_bit(monkeypatch, budget):
    model = tiny_llama()
    batches = make_lm_batches(3)
    monkeypatch.setattr(accumulate, "CPU_BATCH_ADD_BYTES", 0)
    targets, per_hook = _run(model, LLAMA_TARGETS, batches)
    monkeypatch.setattr(accumulate, "CPU_BATCH_ADD_BYTES", budget)
    before = _snapshot(model)
    _, batched = _run(model, LLAMA_TARGETS, batches)
    _assert_restored(model, before)
    for target in targets:
        assert batched.sums[target.name].count == per_hook.sums[target.name].count == 3
        assert torch.equal(batched.sums[target.name].grad, per_hook.sums[target.name].grad), target.name


def test_batched_adds_hold_at_most_the_budget_plus_one_gradient_and_none_after_the_step(monkeypatch):
    model = tiny_llama()
    targets, _ = resolve_targets(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    budget = 20000  # bytes: this model's gradients are 2-8 KiB, so a few are held per add
    monkeypatch.setattr(accumulate, "CPU_BATCH_ADD_BYTES", budget)
    held = []
    original = accumulate.GradientAccumulator._add_batched

    def watch(self, total, grad):
        original(self, total, grad)
        held.append(self._pending_bytes)

    monkeypatch.setattr(accumulate.GradientAccumulator, "_add_batched", watch)
    largest = max(t.in_features * t.out_features * 4 for t in targets)
    with accumulate.GradientAccumulator(model, targets, torch.device("cpu")) as accumulator:
        for step, batch in enumerate(make_lm_batches(3)):
            accumulator.begin_step()
            model(**batch).loss.backward()
            accumulator.defer_step(step, [])
            assert accumulator._pending_bytes == 0  # flushed before the probes read the sums
    assert held and max(held) < budget + largest and 0 in held  # flushed within the step, not only at its end


def test_batch_budget_is_small_for_cpu_sums_and_large_on_an_accelerator():
    model = tiny_llama()
    targets, _ = resolve_targets(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    cpu = accumulate.GradientAccumulator(model, targets, torch.device("cpu"))
    accelerator = accumulate.GradientAccumulator(model, targets, torch.device("meta"))  # any non-CPU device
    assert cpu.batch_add_bytes == accumulate.CPU_BATCH_ADD_BYTES < accelerator.batch_add_bytes
    assert accelerator.batch_add_bytes == accumulate.BATCH_ADD_BYTES


# -- finite checks -------------------------------------------------------------------------------
def _nan_gradient_loss(layer_suffix: str, bad_step: int):
    """A finite loss whose backward makes one layer's gradient NaN at ``bad_step`` (0-based)."""
    step = [-1]

    def poison(_module, _inputs, output):
        output.register_hook(lambda grad: grad * float("nan"))  # NaN flows into this layer's weight gradient
        return output

    def loss_fn(model, batch):
        step[0] += 1
        module = next(m for n, m in model.named_modules() if n.endswith(layer_suffix))
        handle = module.register_forward_hook(poison) if step[0] == bad_step else None
        try:
            return model(**batch).loss
        finally:
            if handle is not None:
                handle.remove()

    return loss_fn


@pytest.mark.parametrize("sketch", [False, True])
def test_nan_gradient_names_layer_and_step(sketch):
    model = tiny_llama()
    before = _snapshot(model)
    loss_fn = _nan_gradient_loss("layers.0.self_attn.q_proj", bad_step=2)
    with pytest.raises(GoraNumericalError, match=r"model\.layers\.0\.self_attn\.q_proj.*step 3"):
        _run(model, LLAMA_TARGETS, make_lm_batches(4), loss_fn=loss_fn, sketch=sketch)
    _assert_restored(model, before)


def test_nan_loss_is_reported_as_loss_before_gradients():
    model = tiny_llama()

    def loss_fn(model, batch):
        return model(**batch).loss * float("nan")

    with pytest.raises(GoraNumericalError, match="loss at estimation step 1 is nan"):
        _run(model, LLAMA_TARGETS, make_lm_batches(2), loss_fn=loss_fn)
    assert all(p.grad is None for p in model.parameters())


# -- where the sums live -------------------------------------------------------------------------
def test_accumulation_device_rules():
    targets, _ = resolve_targets(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    cpu = torch.device("cpu")
    assert accumulation_device(targets, cpu, GoraConfig()) == cpu
    assert accumulation_device(targets, cpu, GoraConfig(offload=False)) == cpu  # nothing to offload from
    meta = torch.device("meta")
    assert accumulation_device(targets, meta, GoraConfig(estimator="sketch", importance="frobenius")) == meta
    assert accumulation_device(targets, meta, GoraConfig(offload=True)) == cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_offloaded_sums_equal_device_sums(dtype):
    model = tiny_llama().to("cuda", dtype)
    batches = [{k: v.cuda() for k, v in b.items()} for b in make_lm_batches(4)]
    before = _snapshot(model)
    _, on_device = _run(model, LLAMA_TARGETS, batches, offload=False)
    _, offloaded = _run(model, LLAMA_TARGETS, batches, offload=True)
    _assert_restored(model, before)
    for name, sums in on_device.sums.items():
        assert sums.grad.is_cuda and offloaded.sums[name].grad.device.type == "cpu"
        assert offloaded.sums[name].grad.dtype == torch.float32 and offloaded.sums[name].count == 4
        torch.testing.assert_close(offloaded.sums[name].grad, sums.grad.cpu(), rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_worker_error_is_raised_and_model_restored(monkeypatch):
    model = tiny_llama().cuda()
    before = _snapshot(model)
    original = offload.PinnedOffload.add

    def add_into_wrong_shape(self, total, grad, alpha):
        original(self, total[:1], grad, alpha)  # the worker's add_ cannot broadcast (out, in) into (1, in)

    monkeypatch.setattr(offload.PinnedOffload, "add", add_into_wrong_shape)
    with pytest.raises(RuntimeError, match="adding an offloaded gradient on the host failed"):
        _run(model, LLAMA_TARGETS, [{k: v.cuda() for k, v in b.items()} for b in make_lm_batches(2)], offload=True)
    _assert_restored(model, before)
