"""Head warm-up under torch.distributed: 2 gloo processes on CPU warm one head, that of one process over all batches.

Rank 1 starts from another head than rank 0 (as two processes that seeded differently would): rank 0's head is
broadcast first, and each step's head gradients are averaged over the processes, so both ranks end with the head one
process gets from the concatenated batches of each step; each rank's own model is put back as it was.

The module runs itself as the launcher (tests/launch.py): ``python test_head_warmup_distributed.py WORKDIR`` spawns
the two ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # the spawned ranks import the shared fixtures too
    sys.path.insert(0, str(TESTS_DIR))

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import _bert_config, make_bert_batches  # noqa: E402
from launch import WORLD, init_group, run_launcher, spawn  # noqa: E402

STEPS = 3  # estimation batches per process, and warm-up steps


def _tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config()).eval()


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")


def _config():
    from gora import GoraConfig

    return GoraConfig(num_steps=STEPS, head_warmup_steps=STEPS, head_warmup_lr=1e-2, show_progress=False)


def _shard(rank: int) -> list[dict]:
    return make_bert_batches(STEPS, seed=30 + rank)


def _rank_main(rank: int, workdir: str) -> None:
    import torch.distributed as dist

    from gora import estimate_gora

    torch.set_num_threads(1)
    init_group(rank, workdir)
    try:
        model = _tiny_bert()
        if rank == 1:  # another starting head than rank 0's
            with torch.no_grad():
                model.classifier.weight.add_(0.5)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        state = estimate_gora(model, _lora_config(), _shard(rank), gora_config=_config())
        state.save(Path(workdir) / f"rank{rank}")
        restored = all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
        (Path(workdir) / f"restored{rank}.json").write_text(json.dumps(restored))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spawn(_rank_main, sys.argv[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("head_warmup_distributed")
    run_launcher(__file__, workdir, timeout=240)
    return workdir


def test_every_process_ends_with_the_head_of_one_process_over_all_batches(runs):
    from gora import GoraState, estimate_gora

    rank0, rank1 = (GoraState.load(runs / f"rank{rank}") for rank in range(WORLD))
    assert rank0.head.keys() == rank1.head.keys() == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(rank0.head[n], rank1.head[n]) for n in rank0.head)  # bit-identical
    assert rank0.ranks == rank1.ranks and all(torch.equal(rank0.C[n], rank1.C[n]) for n in rank0.C)
    # one process whose k-th batch is both processes' k-th batches together: the mean of the two mean losses
    together = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(_shard(0), _shard(1))]
    single = estimate_gora(_tiny_bert(), _lora_config(), together, gora_config=_config())
    for name in single.head:
        torch.testing.assert_close(rank0.head[name], single.head[name], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rank0.head["classifier.weight"], _tiny_bert().classifier.weight)


def test_each_process_gets_its_own_model_back(runs):
    assert [json.loads((runs / f"restored{rank}.json").read_text()) for rank in range(WORLD)] == [True, True]
