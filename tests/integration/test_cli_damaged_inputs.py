"""`gora inspect` and `gora export` on damaged state and adapter directories: exit status 2 and a message that says
what to do, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from peft import LoraConfig

from gora import GoraConfig, estimate_gora
from gora.atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, SIDECAR_FILE, TENSOR_FILE
from gora.cli import main

from conftest import make_lm_batches, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama directory, a state estimated on it, and the portable adapter `gora export` writes from it."""
    root = tmp_path_factory.mktemp("damaged")
    model = tiny_llama()
    model.save_pretrained(root / "model")
    state = estimate_gora(model, LoraConfig(**LORA), make_lm_batches(2), GoraConfig(num_steps=2, show_progress=False))
    state.save(root / "state")
    assert main(["export", str(root / "model"), str(root / "state"), "-o", str(root / "adapter")]) == 0
    return root


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


DAMAGE = {
    "truncated adapter_config.json": (ADAPTER_CONFIG, lambda p: _truncate(p)),
    "adapter_config.json not an object": (ADAPTER_CONFIG, lambda p: p.write_text("[1, 2]")),
    "adapter_config.json with target_modules a number": (ADAPTER_CONFIG, lambda p: _edit_json(p, target_modules=5)),
    "adapter_config.json with a list of ranks": (ADAPTER_CONFIG, lambda p: _edit_json(p, rank_pattern=[1, 2])),
    "truncated adapter weights": (ADAPTER_WEIGHTS, lambda p: _truncate(p)),
    "adapter weights of zero bytes": (ADAPTER_WEIGHTS, lambda p: p.write_bytes(b"")),
    "truncated sidecar": (SIDECAR_FILE, lambda p: _truncate(p)),
    "sidecar ranks a list": (SIDECAR_FILE, lambda p: _edit_json(p, ranks=[4, 4])),
    "sidecar importance a list": (SIDECAR_FILE, lambda p: _edit_json(p, importance=[0.5])),
    "sidecar budget a string": (SIDECAR_FILE, lambda p: _edit_json(p, budget="many")),
    "sidecar skipped a list": (SIDECAR_FILE, lambda p: _edit_json(p, skipped=["x"])),
    "sidecar rank of 1e400": (SIDECAR_FILE, lambda p: _edit_json(p, ranks={"model.layers.0.self_attn.q_proj": 1e400})),
    "sidecar of a newer format": (SIDECAR_FILE, lambda p: _edit_json(p, format_version=99)),
}


def _damaged_copy(saved, tmp_path, name: str, damage) -> object:
    source = "state" if name in (META_FILE, TENSOR_FILE) else "adapter"
    target = tmp_path / source
    shutil.copytree(saved / source, target)
    damage(target / name)
    return target


def _assert_clean_refusal(code: int, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "gora: error: " in err, err
    return err


@pytest.mark.parametrize("name, damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_export_of_a_damaged_adapter_exits_2_with_a_message(saved, tmp_path, capsys, name, damage):
    adapter = _damaged_copy(saved, tmp_path, name, damage)
    code = main(["export", str(saved / "model"), str(adapter), "-o", str(tmp_path / "merged"), "--merged"])
    if name == SIDECAR_FILE:  # export reads the adapter through PEFT: the sidecar is not needed
        assert code == 0, capsys.readouterr().err
        return
    err = _assert_clean_refusal(code, capsys)
    assert str(adapter) in err and "again" in err, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name, damage", [d for d in DAMAGE.values() if d[0] == SIDECAR_FILE],
                         ids=[k for k, d in DAMAGE.items() if d[0] == SIDECAR_FILE])
def test_inspect_of_a_damaged_sidecar_exits_2_with_a_message(saved, tmp_path, capsys, name, damage):
    adapter = _damaged_copy(saved, tmp_path, name, damage)
    err = _assert_clean_refusal(main(["inspect", str(adapter), "--no-plot"]), capsys)
    assert SIDECAR_FILE in err and ("again" in err or "gora-peft" in err), err


STATE_DAMAGE = {
    "truncated state json": (META_FILE, lambda p: _truncate(p)),
    "truncated state tensors": (TENSOR_FILE, lambda p: _truncate(p)),
    "state json of a newer format": (META_FILE, lambda p: _edit_json(p, format_version=99)),
}


@pytest.mark.parametrize("verb", ["inspect", "export"])
@pytest.mark.parametrize("name, damage", STATE_DAMAGE.values(), ids=STATE_DAMAGE.keys())
def test_inspect_and_export_of_a_damaged_state_exit_2_with_a_message(saved, tmp_path, capsys, verb, name, damage):
    state = _damaged_copy(saved, tmp_path, name, damage)
    argv = (["inspect", str(state), "--no-plot"] if verb == "inspect"
            else ["export", str(saved / "model"), str(state), "-o", str(tmp_path / "adapter")])
    err = _assert_clean_refusal(main(argv), capsys)
    assert name in err, err
    assert not (tmp_path / "adapter").exists()


def test_the_undamaged_adapter_inspects_and_exports(saved, tmp_path, capsys):
    assert main(["inspect", str(saved / "adapter"), "--no-plot"]) == 0
    assert main(["export", str(saved / "model"), str(saved / "adapter"), "-o", str(tmp_path / "merged"),
                 "--merged"]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
