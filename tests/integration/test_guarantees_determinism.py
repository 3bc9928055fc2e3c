"""Same seed and data give the same ranks, A and B: run to run, and across processes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gora import GoraState

TESTS_DIR = Path(__file__).resolve().parents[1]

# Executed both in this process and in a fresh interpreter: build the model from a seed, estimate,
# save the state, apply it and save the adapter weights (lora_A, lora_B) the PEFT model holds.
RUN = textwrap.dedent('''
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import BertForSequenceClassification

    from conftest import _bert_config, make_bert_batches
    from gora import GoraConfig, apply_gora, estimate_gora


    def run(out_dir, seed=0):
        torch.manual_seed(0)
        model = BertForSequenceClassification(_bert_config()).eval()
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"])
        state = estimate_gora(model, lora, make_bert_batches(4, seed=3),
                              GoraConfig(num_steps=4, seed=seed, show_progress=False))
        state.save(out_dir + "/state")
        peft_model = apply_gora(model, lora, state)
        weights = {n: p.detach().clone().contiguous() for n, p in peft_model.named_parameters() if "lora_" in n}
        save_file(weights, out_dir + "/adapter.safetensors")
''')


def _run_here(out_dir: Path, seed: int = 0) -> None:
    namespace: dict = {}
    exec(compile(RUN, "<determinism run>", "exec"), namespace)
    namespace["run"](str(out_dir), seed)


def _run_in_subprocess(out_dir: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    script = RUN + f"\nrun({str(out_dir)!r})\n"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_identical(first: Path, second: Path) -> None:
    a, b = GoraState.load(first / "state"), GoraState.load(second / "state")
    assert a.ranks == b.ranks
    assert a.importance == b.importance
    assert a.adapted and set(a.A) == set(b.A) == set(a.adapted)
    for name in a.adapted:
        assert torch.equal(a.A[name], b.A[name]), name
        assert torch.equal(a.C[name], b.C[name]), name
    weights_a, weights_b = load_file(str(first / "adapter.safetensors")), load_file(str(second / "adapter.safetensors"))
    assert weights_a.keys() == weights_b.keys() and any("lora_B" in k for k in weights_a)
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One in-process run with seed 0, shared by the comparisons below."""
    directory = tmp_path_factory.mktemp("determinism") / "first"
    _run_here(directory)
    return directory


def test_same_seed_and_data_give_identical_ranks_a_and_b_run_to_run(first_run, tmp_path):
    _run_here(tmp_path / "again")
    _assert_identical(first_run, tmp_path / "again")


def test_same_seed_and_data_give_identical_ranks_a_and_b_in_another_process(first_run, tmp_path):
    _run_in_subprocess(tmp_path / "there")
    _assert_identical(first_run, tmp_path / "there")


def test_another_seed_draws_another_a_but_the_same_ranks(first_run, tmp_path):
    _run_here(tmp_path / "seed1", seed=1)
    a, b = GoraState.load(first_run / "state"), GoraState.load(tmp_path / "seed1" / "state")
    assert a.ranks == b.ranks  # ranks depend on the gradients only
    assert all(not torch.equal(a.A[n], b.A[n]) for n in a.adapted)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def test_a_dataloader_with_worker_processes_gives_the_same_state_as_a_list(tiny_bert):
    """Worker processes fork when the iterator is made, before GoRA's draw threads start (a fork beside running
    threads can deadlock); the result is the list's, bit for bit."""
    from peft import LoraConfig

    from gora import GoraConfig, estimate_gora

    from conftest import make_bert_batches

    batches = make_bert_batches(4)
    lora, config = LoraConfig(r=4, target_modules=["query", "value"]), GoraConfig(num_steps=4, show_progress=False)
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, num_workers=2)
    from_loader = estimate_gora(tiny_bert, lora, loader, config)
    from_list = estimate_gora(tiny_bert, lora, batches, config)
    assert from_loader.ranks == from_list.ranks and from_loader.importance == from_list.importance
    assert all(torch.equal(from_loader.C[n], from_list.C[n]) and torch.equal(from_loader.A[n], from_list.A[n])
               for n in from_list.C)
