"""GoRA under torch.distributed: 2 gloo processes on CPU.

DDP: each process estimates on its own shard; the state must be identical on both ranks and equal to
one process over all batches with num_steps = 2·N, also for a model passed wrapped in
``DistributedDataParallel``. FSDP/ZeRO-3 path: estimate once, save, every rank calls
apply_gora(GoraState.load(dir)) and gets identical adapters, also through a real FSDP2 ``fully_shard``
training step. A NaN on one rank stops every rank at once, none waits in a collective. Adaptive γ scores the
grid on every process's held-out shard, averaged: the γ one process would choose over all of them.

The module runs itself as the launcher (tests/launch.py): ``python test_distributed.py WORKDIR`` spawns the two
ranks, which write their results under WORKDIR for the tests to compare.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # the spawned ranks import the shared fixtures too
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import _bert_config, make_bert_batches, make_lm_batches, tiny_gpt2  # noqa: E402
from launch import WORLD, init_group, run_launcher, spawn  # noqa: E402

STEPS = 3  # per process
CHUNK = 7  # elements per all-reduce call in the chunked run: every sum is split into many chunks, the last one short
POOLER = "bert.pooler.dense"
FAILURE_TIMEOUT = 20  # seconds a collective may wait in the failure scenarios: a rank left waiting fails fast
ADAPTIVE: dict[str, Any] = dict(num_steps=10, adaptive_steps=True, min_steps=2, convergence_threshold=0.3,
                                show_progress=False)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])


def _tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config()).eval()


def _all_batches():
    return make_bert_batches(WORLD * STEPS, seed=0)


def _gpt2_lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)


def _gpt2_batches():
    return make_lm_batches(WORLD * STEPS, seed=6)


def _held_out() -> list[dict]:
    """Adaptive γ's held-out batches: the estimation batches again, on which the initial step lowers the loss (on
    other random batches of this random model no γ beats W₀ and γ = 0 would say little)."""
    return _all_batches()


def _examples() -> list[dict]:
    """A dataset of single examples, as a Trainer would hold it."""
    return [{k: v[i] for k, v in batch.items()} for batch in make_bert_batches(5, batch=8, seed=4) for i in range(8)]


def _loss_without_pooler(module, batch):
    """BERT's classification loss from the [CLS] hidden state, past the pooler: the pooler gets no gradient."""
    hidden = module.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = module.classifier(module.dropout(hidden[:, 0]))
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def _default_loss(module, batch):
    return module(**batch).loss


def _adaptive_shard(rank: int) -> list[dict]:
    """Rank 0 repeats one batch (its importance converges at min_steps); rank 1's varied batches take longer."""
    if rank == 0:
        return make_bert_batches(1, seed=2) * ADAPTIVE["num_steps"]
    return make_bert_batches(ADAPTIVE["num_steps"], seed=1)


# -- the two ranks ---------------------------------------------------------------------------------
def _rank_main(rank: int, workdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_group(rank, workdir, "main")
    try:
        _ddp_estimation(rank, Path(workdir))
        _ddp_uneven_and_chunked(rank, Path(workdir))
        _ddp_wrapped_estimation(rank, Path(workdir))
        _fsdp_apply(rank, Path(workdir))
    finally:
        dist.destroy_process_group()
    # a fresh group whose collectives time out quickly: a rank left waiting by a failure on the other rank
    # ends with a timeout error after FAILURE_TIMEOUT seconds instead of hanging the test
    init_group(rank, workdir, "failure", timeout_s=FAILURE_TIMEOUT)
    try:
        _nan_on_one_rank(rank, Path(workdir))
    finally:
        dist.destroy_process_group()


def _ddp_estimation(rank: int, workdir: Path) -> None:
    from gora import GoraConfig, estimate_gora
    from gora.trainer import estimation_batches

    shard = _all_batches()[rank * STEPS:(rank + 1) * STEPS]
    variants: list[tuple[str, dict[str, Any]]] = [
        ("ddp", {}), ("ddp_sketch", {"estimator": "sketch", "importance": "frobenius"})]
    for name, extra in variants:
        config = GoraConfig(num_steps=STEPS, show_progress=False, **extra)
        with _diverge_on_rank_1(rank, workdir / name):  # only rank 0's broadcast can make rank 1 agree
            state = estimate_gora(_tiny_bert(), _lora_config(), shard, gora_config=config)
        state.save(workdir / name / f"rank{rank}")
    batches = estimation_batches(_examples(), None, batch_size=4, num_steps=STEPS, seed=5)  # sharded by rank
    config = GoraConfig(num_steps=STEPS, show_progress=False)
    estimate_gora(_tiny_bert(), _lora_config(), batches, gora_config=config).save(workdir / "sharded" / f"rank{rank}")
    state = estimate_gora(_tiny_bert(), _lora_config(), _adaptive_shard(rank), gora_config=GoraConfig(**ADAPTIVE))
    state.save(workdir / "adaptive" / f"rank{rank}")
    held = _held_out()[rank * STEPS:(rank + 1) * STEPS]  # each process scores γ on its own held-out shard
    config = GoraConfig(num_steps=STEPS, adaptive_gamma=True, show_progress=False)
    state = estimate_gora(_tiny_bert(), _lora_config(), shard, gora_config=config, eval_batches=held)
    state.save(workdir / "adaptive_gamma" / f"rank{rank}")
    gpt2_shard = _gpt2_batches()[rank * STEPS:(rank + 1) * STEPS]
    state = estimate_gora(tiny_gpt2(), _gpt2_lora_config(), gpt2_shard,
                          gora_config=GoraConfig(num_steps=STEPS, show_progress=False))
    state.save(workdir / "gpt2" / f"rank{rank}")
    _short_shard(rank, workdir)


@contextlib.contextmanager
def _diverge_on_rank_1(rank: int, directory: Path):
    """On rank 1 only, the local rank allocation and every C differ from rank 0's (as rounding differences between
    processes could make them): both ranks compute the same thing otherwise, so only this shows that rank 0's ranks
    and C are broadcast. What rank 1 computed locally is written to ``directory/diverged_rank1.json``."""
    import gora.api

    if rank != 1:
        yield
        return
    allocate, solve, score = gora.api.allocate_ranks, gora.api.solve_c, gora.api._score_and_project
    record = {"local_ranks": None, "c_perturbed": 0, "local_importance": None, "local_actual_params": None}

    def allocate_differently(*args, **kwargs):
        allocation = allocate(*args, **kwargs)
        max_rank = args[4]  # allocate_ranks(importance, shapes, reference_rank, min_rank, max_rank, features)
        ranks = {name: r + 1 if r < max_rank else r - 1 for name, r in allocation.ranks.items()}
        record["local_ranks"] = ranks
        record["local_actual_params"] = allocation.actual_params + 1
        return dataclasses.replace(allocation, ranks=ranks, actual_params=allocation.actual_params + 1)

    def score_differently(*args, **kwargs):
        importance, projected = score(*args, **kwargs)
        importance = {name: value * (1 + 2**-10) for name, value in importance.items()}
        record["local_importance"] = importance
        return importance, projected

    def solve_differently(*args, **kwargs):
        record["c_perturbed"] += 1
        return solve(*args, **kwargs) * (1 + 2**-10)  # every non-zero entry changes

    gora.api.allocate_ranks, gora.api.solve_c = allocate_differently, solve_differently
    gora.api._score_and_project = score_differently
    try:
        yield
    finally:
        gora.api.allocate_ranks, gora.api.solve_c, gora.api._score_and_project = allocate, solve, score
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "diverged_rank1.json").write_text(json.dumps(record))


def _ddp_uneven_and_chunked(rank: int, workdir: Path) -> None:
    """Two runs on the "ddp" shards: (1) rank 1's loss skips the pooler, so that layer has a gradient on rank 0
    only; rank 1 must still join its all-reduce (with zeros). (2) Every sum all-reduced in chunks of CHUNK elements."""
    import torch.distributed as dist

    from gora import GoraConfig, distributed, estimate_gora

    shard = _all_batches()[rank * STEPS:(rank + 1) * STEPS]
    config = GoraConfig(num_steps=STEPS, show_progress=False)
    loss_fn = _loss_without_pooler if rank == 1 else _default_loss
    estimate_gora(_tiny_bert(), _lora_config(), shard, gora_config=config, loss_fn=loss_fn).save(
        workdir / "ddp_uneven" / f"rank{rank}")

    all_reduce, chunk_elements, calls = dist.all_reduce, distributed.CHUNK_ELEMENTS, []

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce, distributed.CHUNK_ELEMENTS = counting_all_reduce, CHUNK
    try:
        state = estimate_gora(_tiny_bert(), _lora_config(), shard, gora_config=config)
    finally:
        dist.all_reduce, distributed.CHUNK_ELEMENTS = all_reduce, chunk_elements
    state.save(workdir / "ddp_chunked" / f"rank{rank}")
    (workdir / "ddp_chunked" / f"calls{rank}.json").write_text(json.dumps(calls))


def _short_shard(rank: int, workdir: Path) -> None:
    """Rank 1's generator runs out one batch early: every rank must stop and raise, none may hang."""
    from gora import GoraConfig, GoraDataError, estimate_gora

    count = STEPS if rank == 0 else STEPS - 1
    shard = (batch for batch in _all_batches()[:count])  # a generator: its length is unknown up front
    outcome = "no error"
    try:
        estimate_gora(_tiny_bert(), _lora_config(), shard, gora_config=GoraConfig(num_steps=STEPS, show_progress=False))
    except GoraDataError as error:
        outcome = f"GoraDataError: {error}"
    (workdir / "short").mkdir(exist_ok=True)
    (workdir / "short" / f"rank{rank}.txt").write_text(outcome)


def _ddp_wrapped_estimation(rank: int, workdir: Path) -> None:
    """The model passed inside DistributedDataParallel (as after accelerator.prepare), non-target weights trainable."""
    from torch.nn.parallel import DistributedDataParallel

    from gora import GoraConfig, GoraTargetError, apply_gora, estimate_gora, get_gora_model

    from test_hygiene import ModelSnapshot

    model = _tiny_bert()
    wrapped = DistributedDataParallel(model)
    snapshot = ModelSnapshot(model)
    seen = set()

    def loss_fn(module, batch):
        seen.add(type(module).__name__)
        return module(**batch).loss

    shard = _all_batches()[rank * STEPS:(rank + 1) * STEPS]
    outcome = "ok"
    try:  # an error is recorded for its test (DDP's reducer fails the same way on both ranks)
        state = estimate_gora(wrapped, _lora_config(), shard, loss_fn=loss_fn,
                              gora_config=GoraConfig(num_steps=STEPS, show_progress=False))
        state.save(workdir / "ddp_wrapped" / f"rank{rank}")
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}"
    refusals = []
    for call in (lambda: apply_gora(wrapped, _lora_config(), state),  # PEFT must wrap the model, not DDP
                 lambda: get_gora_model(wrapped, _lora_config(), iter(()), loss_fn=loss_fn)):  # before any work
        try:
            call()
            refusals.append("no error")
        except GoraTargetError as error:
            refusals.append(str(error))
    snapshot.assert_unchanged()
    (workdir / "ddp_wrapped").mkdir(exist_ok=True)
    (workdir / "ddp_wrapped" / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome,
                                                                          "loss_fn_saw": sorted(seen),
                                                                          "refusals": refusals}))


def _nan_on_one_rank(rank: int, workdir: Path) -> None:
    """Rank 1's loss is NaN at its second step only: both ranks must raise, at once, with their models restored. fp32
    with the NaN/Inf flags read every 3 steps (the accelerator's deferred schedule), and fp16 (read at once, every
    step)."""
    from gora import GoraConfig, GoraNumericalError, estimate_gora, estimation

    from test_hygiene import ModelSnapshot

    estimation._check_every = lambda device: 3  # this process only: the deferred read, as on an accelerator
    outcomes = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        model = _tiny_bert().to(dtype)
        snapshot = ModelSnapshot(model)
        calls: list[int] = []

        def loss_fn(module, batch, calls=calls):  # this dtype's calls
            calls.append(len(calls))
            loss = module(**batch).loss
            return loss * math.nan if rank == 1 and len(calls) == 2 else loss

        start, outcome = time.perf_counter(), "no error"
        try:
            estimate_gora(model, _lora_config(), make_bert_batches(6, seed=20 + rank), loss_fn=loss_fn,
                          gora_config=GoraConfig(num_steps=6, show_progress=False))
        except GoraNumericalError as error:
            outcome = f"GoraNumericalError: {error}"
        except Exception as error:  # e.g. a collective that timed out: recorded for the test to report
            outcome = f"{type(error).__name__}: {error}"
        seconds = time.perf_counter() - start
        try:
            snapshot.assert_unchanged()
            restored = "restored"
        except AssertionError as error:
            restored = f"not restored: {error}"
        outcomes[name] = {"outcome": outcome, "seconds": seconds, "restored": restored, "forward_passes": len(calls)}
    (workdir / "nan").mkdir(exist_ok=True)
    (workdir / "nan" / f"rank{rank}.json").write_text(json.dumps(outcomes))


def _fsdp_apply(rank: int, workdir: Path) -> None:
    """Each training rank loads the state estimated once by the parent, applies it, then trains with FSDP2."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gora import GoraState, apply_gora

    peft_model = apply_gora(_tiny_bert(), _lora_config(), GoraState.load(workdir / "single"))
    (workdir / "fsdp").mkdir(exist_ok=True)
    weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(weights, str(workdir / "fsdp" / f"rank{rank}.safetensors"))

    mesh = init_device_mesh("cpu", (WORLD,))  # gloo on CPU even where CUDA exists (the default mesh would be CUDA)
    base: Any = peft_model.base_model.model  # BertForSequenceClassification
    for layer in base.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(peft_model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(**make_bert_batches(1, seed=10 + rank)[0]).loss.backward()  # a different batch per rank
    optimizer.step()
    trained = {n: p.full_tensor().detach().contiguous()  # type: ignore[attr-defined]  # a DTensor once sharded
               for n, p in peft_model.named_parameters() if "lora_" in n}
    save_file(trained, str(workdir / "fsdp" / f"trained{rank}.safetensors"))


if __name__ == "__main__":
    spawn(_rank_main, sys.argv[1])


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Parent-side single-process references, then one 2-rank gloo launch that writes every rank's results."""
    from gora import GoraConfig, estimate_gora

    workdir = tmp_path_factory.mktemp("distributed")
    single = estimate_gora(_tiny_bert(), _lora_config(), _all_batches(),
                           gora_config=GoraConfig(num_steps=WORLD * STEPS, show_progress=False))
    single.save(workdir / "single")
    run_launcher(__file__, workdir, timeout=240)
    return workdir


def _load_ranks(workdir: Path, name: str):
    from gora import GoraState

    return [GoraState.load(workdir / name / f"rank{rank}") for rank in range(WORLD)]


def _assert_same_state(first, second) -> None:
    assert first.ranks == second.ranks
    assert first.importance == second.importance
    assert (first.budget, first.actual_params) == (second.budget, second.actual_params)
    assert first.skipped == second.skipped
    assert (first.num_steps, first.num_samples) == (second.num_steps, second.num_samples)
    assert sorted(first.A) == sorted(second.A)
    for name in first.A:
        assert torch.equal(first.A[name], second.A[name]), name
        assert torch.equal(first.C[name], second.C[name]), name


def _assert_matches_single(ddp, single) -> None:
    assert ddp.ranks == single.ranks
    assert ddp.num_steps == single.num_steps == WORLD * STEPS
    assert ddp.num_samples == single.num_samples
    for name in single.A:
        assert torch.equal(ddp.A[name], single.A[name]), name
        scale = single.C[name].abs().max()
        torch.testing.assert_close(ddp.C[name], single.C[name], rtol=1e-4, atol=1e-5 * float(scale))
    for name, value in single.importance.items():
        assert ddp.importance[name] == pytest.approx(value, rel=1e-4)


def _assert_rank_1_diverged_locally(directory: Path, final) -> None:
    """Rank 1's own allocation and C differed from the ranks and C it ended with (rank 0's, broadcast)."""
    record = json.loads((directory / "diverged_rank1.json").read_text())
    assert record["local_ranks"] and all(final.ranks[name] != r for name, r in record["local_ranks"].items())
    assert record["c_perturbed"] >= len(final.C) > 0
    assert record["local_actual_params"] != final.actual_params
    assert record["local_importance"] and all(final.importance[name] != value
                                              for name, value in record["local_importance"].items())


def test_ddp_ranks_end_with_bit_identical_states(runs):
    rank0, rank1 = _load_ranks(runs, "ddp")
    _assert_same_state(rank0, rank1)
    assert len(set(rank0.ranks.values())) > 1  # a real allocation, not one rank everywhere
    _assert_rank_1_diverged_locally(runs / "ddp", rank1)  # so the equality above is rank 0's broadcast


def test_a_layer_with_a_gradient_on_one_rank_only_gives_the_union_of_both_ranks(runs):
    """Rank 1's loss skips the pooler: it has no gradient there, yet joins that layer's all-reduce; the result is
    one process over both shards with the same losses (the pooler averaged over the steps that reached it)."""
    from gora import GoraConfig, estimate_gora

    shard1 = _all_batches()[STEPS:]
    alone = estimate_gora(_tiny_bert(), _lora_config(), shard1, loss_fn=_loss_without_pooler,
                          gora_config=GoraConfig(num_steps=STEPS, show_progress=False))
    assert alone.skipped.get(POOLER) == "no gradient"  # the setup is meaningful: rank 1 alone has none
    rank0, rank1 = _load_ranks(runs, "ddp_uneven")
    _assert_same_state(rank0, rank1)
    assert POOLER not in rank0.skipped and rank0.ranks[POOLER] > 0
    calls = []

    def loss_fn(module, batch):  # the first STEPS batches are rank 0's, the rest rank 1's
        calls.append(None)
        return (_default_loss if len(calls) <= STEPS else _loss_without_pooler)(module, batch)

    single = estimate_gora(_tiny_bert(), _lora_config(), _all_batches(), loss_fn=loss_fn,
                           gora_config=GoraConfig(num_steps=WORLD * STEPS, show_progress=False))
    assert len(calls) == WORLD * STEPS
    _assert_matches_single(rank0, single)
    plain = _load_ranks(runs, "ddp")[0]
    assert rank0.importance[POOLER] != plain.importance[POOLER]  # rank 1's pooler really had no gradient


def test_an_all_reduce_in_many_chunks_equals_one_process_over_all_batches(runs):
    from gora import GoraState

    rank0, rank1 = _load_ranks(runs, "ddp_chunked")
    _assert_same_state(rank0, rank1)
    single = GoraState.load(runs / "single")
    _assert_matches_single(rank0, single)
    _assert_same_state(rank0, _load_ranks(runs, "ddp")[0])  # a + b per entry, whatever the chunks: bit-identical
    chunks = sum(math.ceil(out_features * in_features / CHUNK) for out_features, in_features in single.shapes.values())
    for rank in range(WORLD):
        calls = json.loads((runs / "ddp_chunked" / f"calls{rank}.json").read_text())
        assert sum(1 for numel in calls if numel <= CHUNK) >= chunks  # every sum went in chunks of CHUNK
        assert max(calls) <= CHUNK


def test_ddp_state_equals_one_process_over_all_batches(runs):
    from gora import GoraState

    _assert_matches_single(_load_ranks(runs, "ddp")[0], GoraState.load(runs / "single"))


def test_ddp_sketch_estimator_equals_one_process_over_all_batches(runs):
    from gora import GoraConfig, estimate_gora

    rank0, rank1 = _load_ranks(runs, "ddp_sketch")
    _assert_same_state(rank0, rank1)
    _assert_rank_1_diverged_locally(runs / "ddp_sketch", rank1)
    config = GoraConfig(num_steps=WORLD * STEPS, estimator="sketch", importance="frobenius", show_progress=False)
    _assert_matches_single(rank0, estimate_gora(_tiny_bert(), _lora_config(), _all_batches(), gora_config=config))


def test_adaptive_gamma_under_ddp_scores_both_held_out_shards_as_one_process(runs):
    """Each process scores the γ grid on its own held-out batches; the losses are averaged over processes, so both
    choose the γ that one process scoring all held-out batches chooses."""
    from gora import GoraConfig, estimate_gora
    from gora.gamma_search import mean_loss

    rank0, rank1 = _load_ranks(runs, "adaptive_gamma")
    _assert_same_state(rank0, rank1)
    assert rank0.gamma == rank1.gamma and rank0.notes["adaptive_gamma"] == rank1.notes["adaptive_gamma"]
    config = GoraConfig(num_steps=WORLD * STEPS, adaptive_gamma=True, show_progress=False)
    single = estimate_gora(_tiny_bert(), _lora_config(), _all_batches(), gora_config=config, eval_batches=_held_out())
    _assert_matches_single(rank0, single)
    assert rank0.gamma == single.gamma > 0
    ddp, reference = rank0.notes["adaptive_gamma"], single.notes["adaptive_gamma"]
    assert ddp["baseline_loss"] == pytest.approx(reference["baseline_loss"], rel=1e-6)
    assert ddp["scan"].keys() == reference["scan"].keys()
    for gamma, loss in reference["scan"].items():
        assert ddp["scan"][gamma] == pytest.approx(loss, rel=1e-4), gamma
    # not vacuous: one process's held-out shard alone has another W0 loss than both together
    own = mean_loss(_tiny_bert(), _held_out()[STEPS:], None)
    assert own != pytest.approx(reference["baseline_loss"], rel=1e-4)  # (the processes agree to 1e-6)


def test_ddp_on_conv1d_targets_equals_one_process_over_all_batches(runs):
    """GPT-2's Conv1D gradients are (in, out): their fp32 sums are transposed views, which the all-reduce must
    flatten as they lie in memory."""
    from gora import GoraConfig, estimate_gora

    rank0, rank1 = _load_ranks(runs, "gpt2")
    _assert_same_state(rank0, rank1)
    config = GoraConfig(num_steps=WORLD * STEPS, show_progress=False)
    _assert_matches_single(rank0, estimate_gora(tiny_gpt2(), _gpt2_lora_config(), _gpt2_batches(), gora_config=config))


def test_estimation_batches_shard_by_rank_so_ddp_equals_one_process_with_all_steps(runs):
    from gora import GoraConfig, estimate_gora
    from gora.trainer import estimation_batches

    rank0, rank1 = _load_ranks(runs, "sharded")
    _assert_same_state(rank0, rank1)
    batches = estimation_batches(_examples(), None, batch_size=4, num_steps=WORLD * STEPS, seed=5)
    config = GoraConfig(num_steps=WORLD * STEPS, show_progress=False)
    _assert_matches_single(rank0, estimate_gora(_tiny_bert(), _lora_config(), batches, gora_config=config))


def test_adaptive_steps_under_ddp_stop_together_when_the_slowest_rank_converges(runs):
    from gora import GoraConfig, estimate_gora

    alone = [estimate_gora(_tiny_bert(), _lora_config(), _adaptive_shard(rank), gora_config=GoraConfig(**ADAPTIVE))
             for rank in range(WORLD)]
    stops_alone = [state.notes["adaptive_steps_stopped_at"] for state in alone]
    assert stops_alone[0] == ADAPTIVE["min_steps"] < stops_alone[1] < ADAPTIVE["num_steps"]  # the setup is meaningful

    rank0, rank1 = _load_ranks(runs, "adaptive")
    assert rank0.notes["adaptive_steps_stopped_at"] == rank1.notes["adaptive_steps_stopped_at"] == stops_alone[1]
    assert rank0.num_steps == rank1.num_steps == WORLD * stops_alone[1]
    _assert_same_state(rank0, rank1)


def test_fsdp_path_gives_every_rank_the_adapter_of_the_saved_state(runs):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from gora import GoraState, apply_gora

    reference = get_peft_model_state_dict(apply_gora(_tiny_bert(), _lora_config(), GoraState.load(runs / "single")))
    per_rank = [load_file(str(runs / "fsdp" / f"rank{rank}.safetensors")) for rank in range(WORLD)]
    assert sorted(per_rank[0]) == sorted(per_rank[1]) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(per_rank[0][key], per_rank[1][key]), key
        assert torch.equal(per_rank[0][key], value), key
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in reference.items())  # B is GoRA's, not 0


def test_fully_shard_training_step_keeps_adapters_identical_across_ranks(runs):
    from safetensors.torch import load_file

    trained = [load_file(str(runs / "fsdp" / f"trained{rank}.safetensors")) for rank in range(WORLD)]
    initial = load_file(str(runs / "fsdp" / "rank0.safetensors"))
    assert sorted(trained[0]) == sorted(trained[1]) and trained[0]
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key
    moved = [k for k in trained[0] if not torch.equal(trained[0][k], initial[k.replace(".default.", ".")])]
    assert moved, "the FSDP step did not update the adapters"


def test_a_rank_that_runs_out_of_batches_stops_every_rank_with_a_clear_error(runs):
    outcomes = [(runs / "short" / f"rank{rank}.txt").read_text() for rank in range(WORLD)]
    assert all(o.startswith("GoraDataError") for o in outcomes), outcomes
    assert all(f"gave {STEPS - 1} items" in o for o in outcomes), outcomes


def test_a_ddp_wrapped_model_is_estimated_through_its_module_and_gives_the_unwrapped_state(runs):
    for rank in range(WORLD):  # loss_fn gets the module inside the wrapper (DDP's reducer never runs)
        record = json.loads((runs / "ddp_wrapped" / f"rank{rank}.json").read_text())
        refusals = record.pop("refusals")
        assert record == {"outcome": "ok", "loss_fn_saw": ["BertForSequenceClassification"]}, record
        assert len(refusals) == 2 and all("wrapped in DistributedDataParallel; apply GoRA to the model itself"
                                          in message for message in refusals), refusals
    wrapped, plain = _load_ranks(runs, "ddp_wrapped"), _load_ranks(runs, "ddp")
    _assert_same_state(wrapped[0], wrapped[1])
    _assert_same_state(wrapped[0], plain[0])  # the same shards, unwrapped: bit-identical


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_a_nan_on_one_rank_stops_every_rank_together_with_the_models_restored(runs, dtype):
    rank0, rank1 = (json.loads((runs / "nan" / f"rank{rank}.json").read_text())[dtype] for rank in range(WORLD))
    assert rank1["outcome"].startswith("GoraNumericalError: the loss at estimation step 2 is nan"), rank1
    assert rank0["outcome"].startswith("GoraNumericalError: estimation stopped on all 2 processes because rank 1 "
                                       "found a NaN or Inf loss or gradient; see the GoraNumericalError raised on "
                                       "rank 1"), rank0
    expected_passes = 3 if dtype == "fp32" else 2  # fp32: flags read after step 2 (every 3 steps); fp16: at once
    assert rank0["forward_passes"] == rank1["forward_passes"] == expected_passes
    assert rank0["seconds"] < FAILURE_TIMEOUT / 2 and rank1["seconds"] < FAILURE_TIMEOUT / 2  # nobody waited
    assert rank0["restored"] == rank1["restored"] == "restored"
