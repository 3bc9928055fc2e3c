"""Edges of target naming, state loading and the accumulation-device rule that no other test reaches:

- a target whose name is a dotted suffix of another target (``proj`` inside ``stack.proj``), next to a module
  with the same suffix that is not a target (``other.proj``);
- ``GoraState.load`` given a tensor file that holds tensors for layers the state does not adapt (all checksums
  right, so only that check can refuse it);
- the GPU-memory rule of ``accumulation_device``, on the CPU with torch.cuda's memory queries faked.
"""

import hashlib
import json
from typing import Any

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from gora import GoraConfig, GoraState, GoraStateError, estimate_gora, get_gora_model
from gora.devices import accumulation_device
from gora.targets import TargetLayer


# -- a tiny model whose Linear layers share the suffix "proj" ---------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        with torch.no_grad():
            self.proj.weight.mul_(scale)


class _ProjNet(nn.Module):
    """Modules ``proj``, ``block.proj``, ``stack.proj`` and ``other.proj``, applied in that order.

    ``stack.proj`` sorts after ``proj``: PEFT takes the first rank_pattern key that matches ``(.*\\.)?key$``, in
    insertion (sorted-name) order, so an unanchored key ``proj`` would hand ``stack.proj`` the rank of ``proj``.
    (``block.proj`` sorts before ``proj`` and would get its own key first either way.) The weight scales give the
    three targets different importances, hence different ranks.
    """

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded weights; the global generator is left as it was
            torch.manual_seed(0)
            self.proj = nn.Linear(16, 16)
            self.block = _Holder(1.0)
            self.stack = _Holder(3.0)
            self.other = _Holder(1.0)
        with torch.no_grad():
            self.proj.weight.mul_(0.3)

    def forward(self, x):
        x = torch.tanh(self.proj(x))
        x = torch.tanh(self.block.proj(x))
        x = torch.tanh(self.stack.proj(x))
        return self.other.proj(x)


def _proj_batches(n: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=generator) for _ in range(n)]


def _square_loss(model, batch):
    return model(batch).pow(2).mean()


TARGETS = ["block.proj", "proj", "stack.proj"]
PROJ_LORA: dict[str, Any] = dict(r=4, lora_alpha=8,
                                 target_modules=r"(proj|block\.proj|stack\.proj)")  # PEFT: re.fullmatch
PROJ_GORA: dict[str, Any] = dict(num_steps=2, min_rank=1, max_rank=16, show_progress=False)


def test_a_target_that_is_the_suffix_of_other_modules_gets_its_own_rank_and_other_proj_none():
    peft_model = get_gora_model(_ProjNet(), LoraConfig(**PROJ_LORA), _proj_batches(), GoraConfig(**PROJ_GORA),
                                loss_fn=_square_loss)
    state = peft_model.gora_state
    assert sorted(state.adapted) == TARGETS
    assert len({state.ranks[name] for name in TARGETS}) == 3, state.ranks  # else a mixed-up rank would not show

    modules = dict(peft_model.base_model.model.named_modules())
    for name in TARGETS:
        layer = modules[name]
        assert layer.lora_A["default"].weight.shape == (state.ranks[name], 16), name
        assert layer.lora_B["default"].weight.shape == (16, state.ranks[name]), name
        torch.testing.assert_close(layer.lora_A["default"].weight, state.A[name])
    assert not hasattr(modules["other.proj"], "lora_A")  # same suffix, not a target: left a plain Linear
    assert isinstance(modules["other.proj"], nn.Linear)
    adapted = sorted(n for n, m in modules.items() if hasattr(m, "lora_A"))
    assert adapted == TARGETS


# -- GoraState.load: tensors for layers the state does not adapt --------------------------------------------------
def _rewrite_tensor_file(directory, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the state's tensor file and recompute its size, its SHA-256 and the metadata's own checksum (SHA-256
    of the metadata without ``meta_sha256``, as canonical JSON), so that every integrity check passes."""
    tensor_path, meta_path = directory / "gora_state.safetensors", directory / "gora_state.json"
    save_file(tensors, str(tensor_path), metadata={"format": "gora", "version": "1"})
    data = tensor_path.read_bytes()
    meta = json.loads(meta_path.read_text())
    meta["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    meta["tensors_bytes"] = len(data)
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def proj_state() -> GoraState:
    return estimate_gora(_ProjNet(), LoraConfig(**PROJ_LORA), _proj_batches(), GoraConfig(**PROJ_GORA),
                         loss_fn=_square_loss)


def test_rewritten_checksums_alone_do_not_make_load_refuse(tmp_path, proj_state):
    """The control for the next test: the same tensors rewritten with recomputed checksums load fine."""
    proj_state.save(tmp_path / "state")
    tensors = load_file(str(tmp_path / "state" / "gora_state.safetensors"))
    _rewrite_tensor_file(tmp_path / "state", tensors)
    loaded = GoraState.load(tmp_path / "state")
    assert loaded.ranks == proj_state.ranks
    for name in proj_state.adapted:
        assert torch.equal(loaded.C[name], proj_state.C[name])


@pytest.mark.parametrize("extra_key", ["A::other.proj", "C::other.proj", "A::proj"])
def test_load_refuses_tensors_for_layers_the_state_does_not_adapt(tmp_path, proj_state, extra_key):
    state = proj_state
    if extra_key == "A::proj":  # a layer the state knows, left at rank 0 (skipped): still not adapted
        state = GoraState(**{**vars(proj_state), "ranks": {**proj_state.ranks, "proj": 0},
                             "skipped": {"proj": "no gradient"},
                             "A": {n: t for n, t in proj_state.A.items() if n != "proj"},
                             "C": {n: t for n, t in proj_state.C.items() if n != "proj"}})
    state.save(tmp_path / "state")
    tensors = load_file(str(tmp_path / "state" / "gora_state.safetensors"))
    assert extra_key not in tensors
    tensors[extra_key] = torch.zeros(2, 16)
    _rewrite_tensor_file(tmp_path / "state", tensors)

    name = extra_key.split("::", 1)[1]
    with pytest.raises(GoraStateError, match=rf"holds tensors for \['{name}'\], which the state does not adapt; "
                                             "the files do not belong together"):
        GoraState.load(tmp_path / "state")


# -- accumulation_device: the GPU-memory rule ---------------------------------------------------------------------
def _layers() -> list[TargetLayer]:
    return [TargetLayer("a", nn.Linear(16, 8, device="meta"), 16, 8, False),
            TargetLayer("b", nn.Linear(8, 32, device="meta"), 8, 32, False)]


NEEDED = 4 * (16 * 8 + 8 * 32)  # fp32 bytes of the full estimator's sums
GPU = torch.device("cuda", 1)


def _fake_gpu_memory(monkeypatch, free: int, reserved: int, allocated: int) -> list:
    """torch.cuda's memory queries answer these values (for GPU only) and record the devices they were asked about."""
    asked = []

    def answer(value):
        def query(device=None):
            asked.append(device)
            assert device is not None and torch.device(device) == GPU, f"asked about {device!r}, not {GPU}"
            return value
        return query

    monkeypatch.setattr(torch.cuda, "mem_get_info", answer((free, 80 << 30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", answer(reserved))
    monkeypatch.setattr(torch.cuda, "memory_allocated", answer(allocated))
    return asked


@pytest.mark.parametrize("free, reserved, allocated, stays", [
    (2 * NEEDED, 0, 0, True),  # exactly half of the usable memory: stays
    (2 * NEEDED - 1, 0, 0, False),  # one byte more than half: offloaded
    (NEEDED, 3 * NEEDED, 2 * NEEDED, True),  # usable = free + reserved - allocated = 2 · needed
    (2 * NEEDED, NEEDED, NEEDED + 1, False),  # usable = 2 · needed - 1
    (100 * NEEDED, 0, 0, True),
    (NEEDED, 0, 0, False),  # fits in free memory, but not twice
])
def test_full_sums_stay_on_the_gpu_only_within_half_of_usable_memory(monkeypatch, free, reserved, allocated, stays):
    asked = _fake_gpu_memory(monkeypatch, free, reserved, allocated)
    device = accumulation_device(_layers(), GPU, GoraConfig())
    assert device == (GPU if stays else torch.device("cpu"))
    assert asked and all(torch.device(d) == GPU for d in asked)  # the model's own GPU, not the current one


@pytest.mark.parametrize("config, expected", [
    (GoraConfig(offload=True), torch.device("cpu")),
    (GoraConfig(offload=False), GPU),
    (GoraConfig(estimator="sketch", importance="frobenius"), GPU),  # the sketch's sums are small: never offloaded
])
def test_explicit_offload_and_the_sketch_ignore_gpu_memory(monkeypatch, config, expected):
    _fake_gpu_memory(monkeypatch, free=0, reserved=0, allocated=0)  # nothing usable at all
    assert accumulation_device(_layers(), GPU, config) == expected


def test_a_cpu_model_keeps_its_sums_on_the_cpu(monkeypatch):
    _fake_gpu_memory(monkeypatch, free=1 << 40, reserved=0, allocated=0)
    assert accumulation_device(_layers(), torch.device("cpu"), GoraConfig(offload=False)) == torch.device("cpu")
