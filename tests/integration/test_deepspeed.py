"""GoRA with DeepSpeed ZeRO on 2 gloo processes on the CPU (``DS_BUILD_OPS=0 pip install deepspeed``: no compiled
ops, DeepSpeed's CPU accelerator).

ZeRO-2 partitions gradients inside its engine, so GoRA estimates **before** ``deepspeed.initialize``: each process
on its own shard, as under DDP (GoRA all-reduces its sums), then ``apply_gora``, then the engine. ZeRO-3 partitions
the parameters too: the state is estimated once (here by the parent process, on the full model), saved, and every
rank calls ``apply_gora(model, lora_config, GoraState.load(...))`` before ``deepspeed.initialize``.

The module runs itself as the launcher: ``python test_deepspeed.py WORKDIR`` spawns the two ranks.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # the spawned ranks import the shared fixtures too
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import make_lm_batches, tiny_llama  # noqa: E402

WORLD, STEPS, BATCH = 2, 3, 2


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM")


def _all_batches() -> list[dict]:
    return make_lm_batches(WORLD * STEPS, batch=BATCH, seed=3)


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


def _lora_weights(engine, gather: bool) -> dict[str, torch.Tensor]:
    """The full LoRA tensors of an engine's model (gathered from the ZeRO-3 partitions where ``gather``)."""
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if "lora_" in n]
    context = deepspeed.zero.GatheredParameters([p for _, p in named]) if gather else torch.no_grad()
    with context:
        return {n: p.detach().clone().contiguous() for n, p in named}


def _train_step(engine, rank: int) -> None:
    batch = make_lm_batches(1, batch=BATCH, seed=20 + rank)[0]  # another batch on each rank
    engine.train()
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()


# -- the two ranks ---------------------------------------------------------------------------------
def _rank_main(rank: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed
    from safetensors.torch import save_file

    from gora import GoraConfig, GoraState, apply_gora, estimate_gora

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(workdir)

    # ZeRO-2: estimate on this rank's shard before the engine exists, apply, then the engine
    model = tiny_llama()
    state = estimate_gora(model, _lora_config(), _all_batches()[rank::WORLD],
                          GoraConfig(num_steps=STEPS, show_progress=False))
    state.save(out / f"zero2_state{rank}")
    peft_model = apply_gora(model, _lora_config(), state)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                      config=_ds_config(2))
    save_file(_lora_weights(engine, gather=False), str(out / f"zero2_before{rank}.safetensors"))
    _train_step(engine, rank)
    save_file(_lora_weights(engine, gather=False), str(out / f"zero2_after{rank}.safetensors"))
    del engine

    # ZeRO-3: the state estimated once by the parent; every rank applies it before sharding
    peft_model = apply_gora(tiny_llama(), _lora_config(), GoraState.load(out / "single"))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=peft_model, optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                      config=_ds_config(3))
    sharded = [p for p in engine.module.parameters() if getattr(p, "ds_numel", 0) > p.numel()]
    save_file({"sharded": torch.tensor(len(sharded))}, str(out / f"zero3_sharded{rank}.safetensors"))
    save_file(_lora_weights(engine, gather=True), str(out / f"zero3_before{rank}.safetensors"))
    _train_step(engine, rank)
    save_file(_lora_weights(engine, gather=True), str(out / f"zero3_after{rank}.safetensors"))


def _launch(workdir: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, workdir), nprocs=WORLD)


if __name__ == "__main__":
    _launch(sys.argv[1])


# -- the tests -------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gora import GoraConfig, estimate_gora

    workdir = tmp_path_factory.mktemp("deepspeed")
    single = estimate_gora(tiny_llama(), _lora_config(), _all_batches(),
                           GoraConfig(num_steps=WORLD * STEPS, show_progress=False))
    single.save(workdir / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The launcher picks a free port by binding port 0 and letting it go; another process can take it before the
    # ranks bind it, so a launch that fails is tried again, at most three times (a real failure fails all three).
    for _attempt in range(3):
        result = subprocess.run([sys.executable, __file__, str(workdir)], env=env, capture_output=True, text=True,
                                timeout=400)
        if result.returncode == 0:
            break
    errors = "\n".join(line for line in result.stderr.splitlines() if "Warning" not in line)
    assert result.returncode == 0, errors[-4000:]
    return workdir


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_zero2_estimation_before_the_engine_gives_one_state_on_both_ranks_equal_to_one_process(runs):
    from gora import GoraState

    states = [GoraState.load(runs / f"zero2_state{rank}") for rank in range(WORLD)]
    single = GoraState.load(runs / "single")
    assert states[0].ranks == states[1].ranks == single.ranks
    for name in single.adapted:
        assert torch.equal(states[0].A[name], states[1].A[name]) and torch.equal(states[0].C[name], states[1].C[name])
        torch.testing.assert_close(states[0].C[name], single.C[name], rtol=1e-4, atol=1e-6)


def test_zero2_trains_identical_adapters_on_both_ranks(runs):
    before = [_load(runs / f"zero2_before{rank}.safetensors") for rank in range(WORLD)]
    after = [_load(runs / f"zero2_after{rank}.safetensors") for rank in range(WORLD)]
    _assert_equal(before[0], before[1])
    _assert_equal(after[0], after[1])  # gradients of the two ranks' batches were averaged
    assert any(not torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_zero3_every_rank_applies_the_saved_state_and_trains_sharded(runs):
    from gora import GoraState, apply_gora

    assert all(int(_load(runs / f"zero3_sharded{rank}.safetensors")["sharded"]) > 0 for rank in range(WORLD))
    before = [_load(runs / f"zero3_before{rank}.safetensors") for rank in range(WORLD)]
    after = [_load(runs / f"zero3_after{rank}.safetensors") for rank in range(WORLD)]
    _assert_equal(before[0], before[1])
    reference = apply_gora(tiny_llama(), _lora_config(), GoraState.load(runs / "single"))
    expected = {n: p.detach() for n, p in reference.named_parameters() if "lora_" in n}
    _assert_equal(before[0], expected)  # the gathered adapters are the state's, exactly
    _assert_equal(after[0], after[1])
    assert any(not torch.equal(before[0][k], after[0][k]) for k in before[0])
