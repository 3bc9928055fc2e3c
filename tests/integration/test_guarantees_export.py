"""export_adapter writes atomically: an interrupted export never leaves a half-written adapter under the
final name, a previous export at the same path stays intact, and unrelated content is never deleted."""

import json
import os
import pathlib

import pytest
import torch
from peft import LoraConfig, PeftModel

import gora.export
from gora import GoraConfig, apply_gora, estimate_gora, export_adapter
from gora.errors import GoraStateError, GoraTypeError

from conftest import _bert_config, make_bert_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "gora_config.json")


@pytest.fixture(scope="module")
def peft_model():
    """One GoRA model for the whole module (tests only export it, or nudge a lora_B between exports)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(_bert_config()).eval()
    state = estimate_gora(base, LoraConfig(**LORA), make_bert_batches(3), GoraConfig(num_steps=3, show_progress=False))
    return apply_gora(base, LoraConfig(**LORA), state)


def _contents(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _fail_in_weights(monkeypatch, error):
    """The portable rewrite of adapter_model.safetensors writes half the file, then fails."""
    real = gora.export.save_file

    def save_half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise error

    monkeypatch.setattr(gora.export, "save_file", save_half)


def _fail_in_sidecar(monkeypatch, error):
    """The gora_config.json sidecar, the last file written, is cut half way."""
    real = pathlib.Path.write_text

    def write_half(self, data, *args, **kwargs):
        if self.name == "gora_config.json":
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise error
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_half)


def _fail_in_peft_save(monkeypatch, error):
    """PEFT's own save_pretrained is interrupted after writing the config only."""
    def save_config_only(self, directory, **kwargs):
        pathlib.Path(directory, "adapter_config.json").write_text("{\"r\": ")
        raise error

    monkeypatch.setattr(PeftModel, "save_pretrained", save_config_only)


FAULTS = {
    "weights, disk full": (_fail_in_weights, OSError(28, "No space left on device")),
    "weights, Ctrl-C": (_fail_in_weights, KeyboardInterrupt()),
    "sidecar, Ctrl-C": (_fail_in_sidecar, KeyboardInterrupt()),
    "peft save, Ctrl-C": (_fail_in_peft_save, KeyboardInterrupt()),
}


def _expected(error: BaseException) -> tuple[type, str | None]:
    """What export raises for the injected fault: a disk-full OSError becomes a GoraStateError naming the path and
    the OSError's reason (chained as its cause); an interrupt passes through as itself."""
    if isinstance(error, OSError):
        return GoraStateError, r"cannot write \S*adapter \(No space left on device\)"
    return type(error), None


def _injected(raised: BaseException) -> BaseException | None:
    """The fault behind what export raised: the GoraStateError's cause, or the interrupt itself."""
    return raised.__cause__ if isinstance(raised, GoraStateError) else raised


@pytest.mark.parametrize("fault, error", FAULTS.values(), ids=FAULTS.keys())
def test_interrupted_first_export_leaves_nothing_under_the_final_name(peft_model, tmp_path, monkeypatch, fault, error):
    fault(monkeypatch, error)
    with pytest.raises(_expected(error)[0], match=_expected(error)[1]) as raised:
        export_adapter(peft_model, tmp_path / "adapter")
    assert _injected(raised.value) is error  # the injected fault itself was reached
    assert not (tmp_path / "adapter").exists()
    assert _leftovers(tmp_path) == []


EXPORT_FAULTS = [(fault, error, portable) for fault, error in FAULTS.values() for portable in (True, False)
                 if portable or fault is not _fail_in_weights]  # portable=False does not rewrite the weights
EXPORT_IDS = [f"{name}, portable={portable}" for name, (fault, _) in FAULTS.items() for portable in (True, False)
              if portable or fault is not _fail_in_weights]


@pytest.mark.parametrize("fault, error, portable", EXPORT_FAULTS, ids=EXPORT_IDS)
def test_interrupted_export_keeps_the_previous_export_intact(peft_model, tmp_path, monkeypatch, fault, error, portable):
    export_adapter(peft_model, tmp_path / "adapter", portable=portable)
    before = _contents(tmp_path / "adapter")
    assert set(ADAPTER_FILES) <= set(before)
    with torch.no_grad():  # the next export would differ
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    fault(monkeypatch, error)
    with pytest.raises(_expected(error)[0], match=_expected(error)[1]) as raised:
        export_adapter(peft_model, tmp_path / "adapter", portable=portable)
    assert _injected(raised.value) is error  # the injected fault itself was reached
    monkeypatch.undo()
    assert _contents(tmp_path / "adapter") == before
    assert _leftovers(tmp_path) == []
    json.loads(before["adapter_config.json"])  # the surviving export is whole


def test_the_previous_export_still_loads_in_vanilla_peft_after_an_interrupted_export(peft_model, tmp_path,
                                                                                     monkeypatch):
    from transformers import BertForSequenceClassification

    export_adapter(peft_model, tmp_path / "adapter")
    _fail_in_weights(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        export_adapter(peft_model, tmp_path / "adapter")
    monkeypatch.undo()
    torch.manual_seed(0)
    base = BertForSequenceClassification(_bert_config()).eval()
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert sum("lora_A" in n for n, _ in reloaded.named_parameters()) == 4


def test_export_refuses_to_replace_a_directory_with_other_content(peft_model, tmp_path):
    target = tmp_path / "run"
    (target / "checkpoint-500").mkdir(parents=True)
    (target / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    with pytest.raises(GoraStateError, match="refusing to replace .* checkpoint-500"):
        export_adapter(peft_model, target)
    assert (target / "checkpoint-500" / "optimizer.pt").read_bytes() == b"state"
    assert _leftovers(tmp_path) == []


def test_export_over_a_previous_export_replaces_it(peft_model, tmp_path):
    export_adapter(peft_model, tmp_path / "adapter", portable=False)
    export_adapter(peft_model, tmp_path / "adapter", portable=True)
    assert json.loads((tmp_path / "adapter" / "gora_config.json").read_text())["portable"] is True
    assert _leftovers(tmp_path) == []


def test_export_of_something_that_is_not_a_peft_model_is_a_gora_type_error(tiny_bert, tmp_path):
    with pytest.raises(GoraTypeError, match="export_adapter needs a peft.PeftModel"):
        export_adapter(tiny_bert, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
