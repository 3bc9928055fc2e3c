"""QGoRA without CUDA or bitsandbytes: a GoraUnsupportedError that says what is missing and what to do."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import LoraConfig

from gora import GoraState, GoraUnsupportedError, quantized


def _state() -> GoraState:
    return GoraState(ranks={"layer": 1}, importance={"layer": 1.0}, shapes={"layer": (2, 2)},
                     A={"layer": torch.ones(1, 2)}, C={"layer": torch.ones(2, 1)})


@pytest.mark.parametrize(("cuda", "bnb", "missing"), [
    (False, True, "no CUDA device is visible"),
    (True, False, "the bitsandbytes package is not installed"),
    (False, False, "no CUDA device is visible and the bitsandbytes package is not installed"),
])
def test_4bit_loading_without_cuda_or_bitsandbytes_names_what_is_missing(monkeypatch, cuda, bnb, missing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "bitsandbytes":
            return object() if bnb else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(GoraUnsupportedError, match="4-bit NF4") as error:
        quantized.load_4bit_and_apply("/no/model/needed", LoraConfig(r=1, target_modules=["layer"]), _state())
    message = str(error.value)
    assert missing in message
    assert "gora.apply_gora(model, lora_config, state)" in message  # the way out on this machine


def test_quantization_is_reported_unavailable_on_this_machine_when_it_is():
    reason = quantized.quantization_unavailable_reason()
    has_both = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    assert (reason is None) == has_both
