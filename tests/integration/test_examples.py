"""The example scripts run as a user would run them (torchrun with 2 gloo processes, plain python)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(EXAMPLES / script), *args]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _check_state(directory: Path, world: int, steps: int) -> None:
    from gora import GoraState

    state = GoraState.load(directory)
    assert state.num_steps == world * steps  # steps per process, summed over processes
    assert state.adapted


def test_torchrun_example_estimates_on_two_processes_and_keeps_adapters_identical(tmp_path):
    result = _torchrun("torchrun_estimate.py", "--output", str(tmp_path / "state"), "--num-steps", "3")
    log = result.stdout + result.stderr
    assert "adapters identical on all 2 processes after apply_gora: True" in log
    assert "adapters identical on all 2 processes after training: True" in log
    _check_state(tmp_path / "state", world=2, steps=3)


def test_accelerate_example_estimates_on_two_processes_and_keeps_adapters_identical(tmp_path):
    pytest.importorskip("accelerate")
    result = _torchrun("accelerate_estimate.py", "--output", str(tmp_path / "state"), "--num-steps", "3")
    log = result.stdout + result.stderr
    assert "adapters identical on all 2 processes after apply_gora and after training: True" in log
    _check_state(tmp_path / "state", world=2, steps=3)


def test_trainer_example_trains_with_loraplus_and_reloads_with_vanilla_peft(tmp_path):
    command = [sys.executable, str(EXAMPLES / "trainer_example.py"), "--output", str(tmp_path), "--estimation-steps",
               "2", "--train-steps", "2", "--batch-size", "4"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "'gora/budget'" in log  # the first Trainer log carried GoRA's metrics to the reporters
    for name in ("adapter", "adapter_portable"):
        assert f"vanilla PeftModel.from_pretrained({name}): max |logit difference|" in log
        assert (tmp_path / name / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_portable" / "gora_config.json").is_file()
