"""After estimation or apply (success, exception or KeyboardInterrupt) the base model is exactly as before.

Checked each time: weights and buffers bit-identical (``torch.equal``), ``requires_grad`` flags, train/eval
modes, module tree and attributes, every ``.grad`` (a user's pre-existing ``.grad`` is put
back, the same tensor), and no hook left: no post-accumulate-grad or tensor hook on any parameter, no
forward/backward hook on any module, no global module hook.
"""

import copy

import pytest
import torch
from peft import LoraConfig
from torch.nn.modules import module as nn_module

import gora.accumulate
import gora.offload
import gora.peft_bridge
from gora import GoraConfig, apply_gora, estimate_gora
from gora.errors import GoraDataError, GoraNumericalError, GoraStateError

from conftest import _bert_config, make_bert_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"])
STEPS = 4


def _hook_counts(model):
    params = {name: (len(getattr(p, "_post_accumulate_grad_hooks", None) or {}), len(p._backward_hooks or {}))
              for name, p in model.named_parameters()}
    modules = {name: tuple(len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                              "_backward_hooks", "_backward_pre_hooks"))
               for name, m in model.named_modules()}
    global_hooks = tuple(len(getattr(nn_module, attr)) for attr in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
    return params, modules, global_hooks


class ModelSnapshot:
    """Everything about a model that estimation and apply promise to leave (or put back) as it was."""

    def __init__(self, model):
        self.model = model
        self.tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self.grads = {name: p.grad for name, p in model.named_parameters()}  # the objects themselves
        self.grad_values = {name: g.clone() for name, g in self.grads.items() if g is not None}
        self.modes = {name: m.training for name, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.attributes = {name: set(vars(m)) for name, m in model.named_modules()}
        self.hooks = _hook_counts(model)

    def assert_unchanged(self):
        model = self.model
        modules = dict(model.named_modules())
        assert modules.keys() == self.modules.keys()
        assert all(modules[name] is self.modules[name] for name in modules), "a module was replaced"
        assert {name: set(vars(m)) for name, m in modules.items()} == self.attributes, "attributes added"
        tensors = model.state_dict()
        assert tensors.keys() == self.tensors.keys()
        changed = [name for name, t in tensors.items() if not torch.equal(t, self.tensors[name])]
        assert not changed, f"weights or buffers changed: {changed}"
        assert {name: p.requires_grad for name, p in model.named_parameters()} == self.flags
        assert {name: m.training for name, m in modules.items()} == self.modes
        for name, p in model.named_parameters():
            assert p.grad is self.grads[name], f".grad of {name} not restored"
            if p.grad is not None:
                assert torch.equal(p.grad, self.grad_values[name]), f".grad of {name} was modified"
        assert _hook_counts(model) == self.hooks, "hooks left behind"


@pytest.fixture
def prepared_bert(tiny_bert):
    """A tiny BERT in a deliberately mixed state: some modules in train mode, some parameters frozen
    (a target weight among them), a user's .grad on a target and on a non-target weight."""
    model = tiny_bert
    model.bert.encoder.layer[0].train()
    model.classifier.train()
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[1].attention.self.query.weight.requires_grad_(False)
    target = model.bert.encoder.layer[0].attention.self.value.weight
    target.grad = torch.full_like(target, 0.5)
    model.bert.pooler.dense.weight.grad = torch.ones_like(model.bert.pooler.dense.weight)
    assert all(not any(counts) for counts in _hook_counts(model)[0].values())
    return model


def _config(**kwargs):
    return GoraConfig(num_steps=STEPS, show_progress=False, **kwargs)


def _interrupt_at(step: int, exception: BaseException):
    """A loss_fn that raises ``exception`` at estimation step ``step`` (after the earlier steps' backward)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        if calls["n"] == step:
            raise exception
        calls["n"] += 1
        return model(**batch).loss

    return loss_fn


# -- estimation ------------------------------------------------------------------------------------
def test_estimation_leaves_the_model_exactly_as_before(prepared_bert):
    snapshot = ModelSnapshot(prepared_bert)
    state = estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config())
    assert state.adapted  # it did real work
    snapshot.assert_unchanged()


@pytest.mark.parametrize("step", [0, 1, STEPS - 1])
def test_keyboard_interrupt_in_loss_fn_leaves_the_model_as_before(prepared_bert, step):
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(),
                      loss_fn=_interrupt_at(step, KeyboardInterrupt()))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("step", [0, 2])
def test_keyboard_interrupt_inside_backward_leaves_the_model_as_before(prepared_bert, step):
    """A hook on the first layer's weight gradient raises mid-backward: the later layers' gradients were
    already accumulated (their gora hooks fired), the earlier ones not yet."""
    weight = prepared_bert.bert.encoder.layer[0].attention.self.query.weight
    handles = []
    calls = {"n": 0}

    def loss_fn(model, batch):
        if calls["n"] == step:
            def interrupt(grad):
                raise KeyboardInterrupt

            handles.append(weight.register_hook(interrupt))
        calls["n"] += 1
        return model(**batch).loss

    snapshot = ModelSnapshot(prepared_bert)
    try:
        with pytest.raises(KeyboardInterrupt):
            estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)
    finally:
        for handle in handles:  # the test's own hook; everything else must be gone already
            handle.remove()
    assert handles, "the interrupting hook was never installed"
    snapshot.assert_unchanged()


def test_keyboard_interrupt_on_the_output_gradient_leaves_the_model_as_before(prepared_bert):
    def loss_fn(model, batch):
        output = model(**batch)
        output.logits.register_hook(lambda grad: (_ for _ in ()).throw(KeyboardInterrupt()))
        return output.loss

    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)
    snapshot.assert_unchanged()


def _nan_loss_at_step_2(model, batch):
    _nan_loss_at_step_2.calls = getattr(_nan_loss_at_step_2, "calls", 0) + 1
    loss = model(**batch).loss
    return loss * float("nan") if _nan_loss_at_step_2.calls == 3 else loss


def _short_generator():
    yield from make_bert_batches(STEPS - 2)


FAILURES = {
    "NaN loss at step 2": (dict(loss_fn=_nan_loss_at_step_2), GoraNumericalError, "step 3 is nan"),  # the third batch
    "model raises on a bad batch": (dict(batches=make_bert_batches(2) + [{"labels": torch.tensor([0])}] * 2),
                                    ValueError, "input_ids"),
    "generator too short": (dict(batches=_short_generator()), GoraDataError, "gave 2 items but num_steps=4"),
    "Inf gradient": (dict(loss_fn=lambda m, b: _infinite_grad_loss(m, b)), GoraNumericalError, "NaN or Inf"),
    "train mode forced, then interrupted": (dict(config=_config(train_mode=True),
                                                 loss_fn=_interrupt_at(2, KeyboardInterrupt())),
                                            KeyboardInterrupt, None),
}


def _infinite_grad_loss(model, batch):
    output = model(**batch)
    output.logits.register_hook(lambda grad: grad * float("inf"))
    return output.loss


@pytest.mark.parametrize("kwargs, error, message", FAILURES.values(), ids=FAILURES.keys())
def test_failed_estimation_leaves_the_model_as_before(prepared_bert, kwargs, error, message):
    _nan_loss_at_step_2.calls = 0
    kwargs = dict(kwargs)
    batches = kwargs.pop("batches", make_bert_batches(STEPS))
    config = kwargs.pop("config", _config())
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(error, match=message):
        estimate_gora(prepared_bert, LoraConfig(**LORA), batches, config, **kwargs)
    snapshot.assert_unchanged()


# offload=True is not in this list: on a CPU model it runs the default path (the pinned offload is made only for CUDA
# weights), so it would check nothing new. test_interrupt_with_the_pinned_offload_leaves_the_model_as_before does.
@pytest.mark.parametrize("variant", [
    dict(estimator="sketch", importance="frobenius"),
    dict(adaptive_steps=True, min_steps=2),
], ids=["sketch", "adaptive steps"])
def test_interrupt_in_every_estimator_variant_leaves_the_model_as_before(prepared_bert, variant):
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(**variant),
                      loss_fn=_interrupt_at(2, KeyboardInterrupt()))
    snapshot.assert_unchanged()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned offload exists only for CUDA weights")
def test_interrupt_with_the_pinned_offload_leaves_the_model_as_before(prepared_bert, monkeypatch):
    model = prepared_bert.cuda()  # the user's .grad tensors move with their parameters
    made = []  # every PinnedOffload the estimation makes, and how many gradients it was handed

    class RecordingOffload(gora.offload.PinnedOffload):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.adds = 0
            made.append(self)

        def add(self, *args, **kwargs):
            self.adds += 1
            return super().add(*args, **kwargs)

    monkeypatch.setattr(gora.accumulate, "PinnedOffload", RecordingOffload)
    interrupt = _interrupt_at(2, KeyboardInterrupt())
    seen = []

    def loss_fn(model, batch):
        seen.append([(offload.adds, offload._thread.is_alive()) for offload in made])  # the state as step starts
        return interrupt(model, batch)

    snapshot = ModelSnapshot(model)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(model, LoraConfig(**LORA), make_bert_batches(STEPS), _config(offload=True), loss_fn=loss_fn)
    assert len(made) == 1, "offload=True on a CUDA model did not use the pinned offload"
    assert len(seen) == 3 and seen[-1][0][0] > 0 and seen[-1][0][1]  # interrupted with the worker alive and in use
    assert not made[0]._thread.is_alive()  # the worker was stopped on the way out
    snapshot.assert_unchanged()


@pytest.mark.parametrize("search", ["golden", "scan"])
def test_interrupt_during_the_adaptive_gamma_scan_removes_its_hooks_and_restores_modes(prepared_bert, search):
    """The search adds ΔW₀ through forward hooks in eval mode; interrupt it half way."""
    config = _config(adaptive_gamma=True, gamma_search=search, gamma_grid=[0.5, 0.1, 0.05, 0.01])
    loss_fn = _interrupt_at(STEPS + 3, KeyboardInterrupt())  # after the estimation steps and 2 scan losses
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), config, loss_fn=loss_fn,
                      eval_batches=make_bert_batches(1, seed=9))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("exception", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupt_during_the_held_out_losses_of_the_diagnostics_leaves_the_model_as_before(prepared_bert, exception):
    """Without adaptive γ, eval_batches are scored at W₀ and after init (the diagnostics): interrupt the second."""
    loss_fn = _interrupt_at(STEPS + 1, exception)  # after the estimation steps and the W0 loss
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(type(exception)):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn,
                      eval_batches=make_bert_batches(1, seed=9))
    snapshot.assert_unchanged()


@pytest.mark.parametrize("call", [2, 6 + 2, 6 + STEPS + 1])  # in the warm-up, in estimation, in the held-out losses
@pytest.mark.parametrize("exception", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupt_during_or_after_the_head_warm_up_puts_the_cold_head_back(prepared_bert, call, exception):
    """The warm-up trains the head in place: whatever stops estimation, the head is the user's again (values,
    flags, the classifier's train mode from the fixture), and no .grad of the warm-up's is left."""
    prepared_bert.classifier.weight.grad = torch.full_like(prepared_bert.classifier.weight, 3.0)  # the user's
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(type(exception)):
        estimate_gora(prepared_bert, LoraConfig(**LORA, task_type="SEQ_CLS"), make_bert_batches(STEPS),
                      _config(head_warmup_steps=6, head_warmup_lr=0.1), loss_fn=_interrupt_at(call, exception),
                      eval_batches=make_bert_batches(1, seed=9))
    snapshot.assert_unchanged()


def test_a_successful_head_warm_up_leaves_the_model_exactly_as_before(prepared_bert):
    snapshot = ModelSnapshot(prepared_bert)
    state = estimate_gora(prepared_bert, LoraConfig(**LORA, task_type="SEQ_CLS"), make_bert_batches(STEPS),
                          _config(head_warmup_steps=6, head_warmup_lr=0.1))
    assert not torch.equal(state.head["classifier.weight"], prepared_bert.classifier.weight)
    snapshot.assert_unchanged()


def test_gradient_checkpointing_is_switched_off_again_after_an_interrupt(prepared_bert):
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS),
                      _config(train_mode=True, gradient_checkpointing=True),
                      loss_fn=_interrupt_at(1, KeyboardInterrupt()))
    assert not prepared_bert.is_gradient_checkpointing
    snapshot.assert_unchanged()


def test_fp16_overflow_that_scaling_cannot_fix_leaves_the_fp16_model_as_before(tiny_bert):
    model = tiny_bert.half()

    def loss_fn(model, batch):
        output = model(**batch)
        output.logits.register_hook(lambda grad: grad * 1e6)  # overflows fp16 at any loss scale >= 1
        return output.loss

    snapshot = ModelSnapshot(model)
    with pytest.raises(GoraNumericalError, match="overflow at estimation step 1 even without loss scaling"):
        estimate_gora(model, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)
    snapshot.assert_unchanged()


def test_the_model_is_usable_again_after_an_interrupted_estimation(prepared_bert):
    with pytest.raises(KeyboardInterrupt):
        estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(),
                      loss_fn=_interrupt_at(1, KeyboardInterrupt()))
    first = estimate_gora(prepared_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config())
    assert first.num_steps == STEPS and all(first.ranks[n] > 0 for n in first.adapted)


# -- apply -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state():
    """A state estimated on a model of tiny_bert's architecture (apply only reads it)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config()).eval()
    return estimate_gora(model, LoraConfig(**LORA), make_bert_batches(STEPS), _config())


def _lora_with_head():
    return LoraConfig(**LORA, modules_to_save=["classifier"])


def test_keyboard_interrupt_after_peft_wrapped_the_model_puts_it_back(prepared_bert, state, monkeypatch):
    real = gora.peft_bridge.get_peft_model

    def wrap_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)  # PEFT has now replaced layers, frozen the base and copied the head
        raise KeyboardInterrupt

    monkeypatch.setattr(gora.peft_bridge, "get_peft_model", wrap_then_interrupt)
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        apply_gora(prepared_bert, _lora_with_head(), state)
    snapshot.assert_unchanged()


def test_keyboard_interrupt_while_copying_adapter_weights_puts_the_model_back(prepared_bert, state, monkeypatch):
    real = gora.peft_bridge._copy_adapter_weights

    def copy_one_then_interrupt(peft_model, weights, adapter_name):
        first = dict([next(iter(weights.items()))])
        real(peft_model, first, adapter_name)
        raise KeyboardInterrupt

    monkeypatch.setattr(gora.peft_bridge, "_copy_adapter_weights", copy_one_then_interrupt)
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(KeyboardInterrupt):
        apply_gora(prepared_bert, _lora_with_head(), state)
    snapshot.assert_unchanged()
    monkeypatch.undo()
    peft_model = apply_gora(prepared_bert, _lora_with_head(), state)  # and it can still be applied
    assert peft_model.peft_config["default"].rank_pattern


def test_state_refused_by_apply_never_touches_the_model(prepared_bert, state, monkeypatch):
    monkeypatch.setattr(gora.peft_bridge, "get_peft_model",
                        lambda *a, **k: pytest.fail("the model was handed to PEFT despite a bad state"))
    state = copy.deepcopy(state)
    state.C[state.adapted[0]] = state.C[state.adapted[0]][:, :1]  # damaged: C no longer fits the rank
    snapshot = ModelSnapshot(prepared_bert)
    with pytest.raises(GoraStateError, match="do not fit rank"):
        apply_gora(prepared_bert, _lora_with_head(), state)
    snapshot.assert_unchanged()
