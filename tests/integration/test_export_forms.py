"""Every export form gives the in-memory model's logits when read by vanilla PEFT / transformers in a process that
cannot import gora: native, portable, uniform-rank (``pad_to_max_rank``) and merged. Their configs hold nothing a
LoRA server refuses, and the export names the smallest ``--max-lora-rank`` vLLM allows."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, GoraState, apply_gora, estimate_gora, export_adapter
from gora.errors import GoraConfigError, GoraStateError, GoraTypeError
from gora.export import SIDECAR_KEYS, rank_info, read_sidecar
from gora.serving import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

from conftest import make_lm_batches, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
            task_type="CAUSAL_LM")
PROBE = torch.tensor([[5, 17, 3, 42, 8, 99, 1, 64], [7, 7, 21, 0, 13, 55, 2, 30]])
# vLLM's LoRA loader refuses other init_lora_weights strings; True/False are booleans, not strings
SERVER_INIT_STRINGS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}

VANILLA = r"""
import sys
sys.modules["gora"] = None  # this process cannot import gora: only PEFT and transformers read the exports
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, probe_path, out_path, *forms = sys.argv[1:]
probe = torch.load(probe_path)
logits = {}
for form in forms:
    kind, path = form.split("=", 1)
    if kind == "merged":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), path)
    with torch.no_grad():
        logits[kind] = model.eval()(input_ids=probe).logits
torch.save(logits, out_path)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    state = estimate_gora(base, LoraConfig(**LORA), make_lm_batches(4),
                          GoraConfig(num_steps=4, max_rank=12, show_progress=False))
    peft_model = apply_gora(base, LoraConfig(**LORA), state)
    with torch.no_grad():  # trained-looking adapters: B != its initial value everywhere
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
        expected = peft_model(input_ids=PROBE).logits
    export_adapter(peft_model, root / "native", portable=False)
    export_adapter(peft_model, root / "portable")
    export_adapter(peft_model, root / "uniform", pad_to_max_rank=True)
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(root / "merged")
    return root, peft_model, state, expected


def test_every_form_gives_the_in_memory_logits_in_vanilla_peft_without_gora(exported, tmp_path):
    root, _, _, expected = exported
    torch.save(PROBE, tmp_path / "probe.pt")
    forms = [f"{kind}={root / kind}" for kind in ("native", "portable", "uniform", "merged")]
    done = subprocess.run([sys.executable, "-c", VANILLA, str(root / "base"), str(tmp_path / "probe.pt"),
                           str(tmp_path / "logits.pt"), *forms], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    logits = torch.load(tmp_path / "logits.pt")
    assert set(logits) == {"native", "portable", "uniform", "merged"}
    torch.testing.assert_close(logits["native"], expected, rtol=0, atol=0)
    for kind in ("portable", "uniform", "merged"):
        torch.testing.assert_close(logits[kind], expected, rtol=1e-5, atol=1e-5, msg=kind)
    assert not torch.allclose(expected, _base_logits(root), atol=1e-3)  # the adapters do change the output


def _base_logits(root):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()(input_ids=PROBE).logits


def test_the_uniform_form_has_one_rank_and_one_scaling_with_zero_padding(exported):
    root, _, state, _ = exported
    config = json.loads((root / "uniform" / "adapter_config.json").read_text())
    r_max = max(state.ranks.values())
    assert len({state.ranks[n] for n in state.adapted}) > 1  # the ranks really differ: padding matters
    assert config["r"] == config["lora_alpha"] == r_max and config["use_rslora"] is False
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    from safetensors.torch import load_file

    weights = load_file(str(root / "uniform" / "adapter_model.safetensors"))
    for key, tensor in weights.items():
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        rank = state.ranks[name]
        if ".lora_A." in key:
            assert tensor.shape[0] == r_max and not tensor[rank:].any(), key
        else:
            assert tensor.shape[1] == r_max and not tensor[:, rank:].any(), key
    assert read_sidecar(root / "uniform")["uniform_rank"] is True


@pytest.mark.parametrize("form", ["native", "portable", "uniform"])
def test_exported_configs_hold_nothing_a_lora_server_refuses(exported, form):
    root, _, state, _ = exported
    config = json.loads((root / form / "adapter_config.json").read_text())
    init = config["init_lora_weights"]
    assert isinstance(init, bool) or init in SERVER_INIT_STRINGS, init
    assert config["use_dora"] is False and config.get("lora_bias", False) is False
    assert not config.get("modules_to_save") and config.get("layers_to_transform") is None
    assert isinstance(config["r"], int) and config["r"] <= vllm_max_lora_rank(max(state.ranks.values()))
    keys = set(config["target_modules"]) if isinstance(config["target_modules"], list) else None
    assert keys is not None and keys == set(state.adapted)  # exact names, rank-0 layers left out
    assert set(config["rank_pattern"]) == set(config["alpha_pattern"])
    assert "gora" not in json.dumps(config).lower()


def test_the_export_names_the_smallest_vllm_max_lora_rank_that_fits(exported, tmp_path, caplog):
    _, peft_model, state, _ = exported
    r_max = max(state.ranks.values())
    with caplog.at_level(logging.WARNING, logger="gora"):
        export_adapter(peft_model, tmp_path / "adapter", pad_to_max_rank=True)
    size = vllm_max_lora_rank(r_max)
    assert size in VLLM_MAX_LORA_RANKS and size >= r_max
    assert f"--max-lora-rank {size} " in caplog.text


@pytest.mark.parametrize("rank, size", [(1, 1), (2, 8), (8, 8), (9, 16), (257, 320), (320, 320), (321, 512),
                                        (512, 512), (513, None)])
def test_vllm_sizes(rank, size):
    assert vllm_max_lora_rank(rank) == size


def test_padding_needs_the_portable_form(exported, tmp_path):
    _, peft_model, _, _ = exported
    with pytest.raises(GoraConfigError, match="pass portable=True"):
        export_adapter(peft_model, tmp_path / "adapter", portable=False, pad_to_max_rank=True)
    assert not (tmp_path / "adapter").exists()


# -- the state travels with the model, not in a registry -----------------------------------------------------
def test_the_state_travels_as_an_attribute_of_the_model(exported, tmp_path):
    _, peft_model, state, _ = exported
    assert peft_model.gora_state is state
    clone = copy.deepcopy(peft_model)  # a copy is another object: a registry keyed by the model would lose it
    export_adapter(clone, tmp_path / "clone")
    sidecar = json.loads((tmp_path / "clone" / "gora_config.json").read_text())
    assert sidecar["importance"] == pytest.approx(state.importance) and sidecar["budget"] == state.budget


def test_a_reloaded_model_exports_with_the_state_passed_or_the_layers_ranks(exported, tmp_path):
    root, _, state, _ = exported
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "base")), root / "native")
    assert getattr(reloaded, "gora_state", None) is None
    export_adapter(reloaded, tmp_path / "plain")
    plain = read_sidecar(tmp_path / "plain")
    assert plain["ranks"] == {n: r for n, r in state.ranks.items() if r > 0} and "importance" not in plain
    export_adapter(reloaded, tmp_path / "with_state", state=state)
    assert read_sidecar(tmp_path / "with_state")["importance"] == pytest.approx(state.importance)
    with pytest.raises(GoraTypeError, match="state must be a GoraState"):
        export_adapter(reloaded, tmp_path / "bad", state=str(root / "native"))


def test_the_sidecar_holds_the_described_keys_and_reads_back_as_the_states_rank_info(exported):
    root, _, state, _ = exported
    written = json.loads((root / "portable" / "gora_config.json").read_text())
    own = {"format", "format_version", "native_scalings", "versions"}
    assert set(written) == own | set(SIDECAR_KEYS)
    assert written["r"] == state.reference_rank and written["gora_config"] == state.config
    assert read_sidecar(root / "portable") == rank_info(state) | {"portable": True, "uniform_rank": False}


@pytest.mark.parametrize("edit, message", [
    ({"ranks": {"a": "x"}}, r"damaged \(ranks: expected an integer >= 0, got 'x'\)"),
    ({"gamma": 1e400}, r"damaged \(gamma: expected a finite number, got inf\)"),
    ({"portable": 1}, r"damaged \(portable: expected true or false, got 1\)"),
    ({"ranks": None, "format_version": 2, "versions": {"gora-peft": "9.0"}},
     r"format version 2, written by gora-peft 9\.0.*or export the adapter again with this version"),
])
def test_a_damaged_or_newer_sidecar_is_refused_naming_what_is_wrong(tmp_path, edit, message):
    sidecar = {"format": "gora-adapter", "format_version": 1, "ranks": {"a": 2}, "gamma": 0.05, "portable": True}
    (tmp_path / "gora_config.json").write_text(json.dumps(sidecar | edit))
    with pytest.raises(GoraStateError, match=message):
        read_sidecar(tmp_path)
    (tmp_path / "gora_config.json").write_text(json.dumps({k: v for k, v in sidecar.items() if k != "ranks"}))
    with pytest.raises(GoraStateError, match=r"damaged \('ranks' is missing\); export the adapter again"):
        read_sidecar(tmp_path)


def test_no_module_of_the_library_keeps_states_or_models(exported):
    """No hidden global state: no module-level container of the library holds a GoraState or a model."""
    import importlib
    import pkgutil

    import gora

    _, peft_model, state, _ = exported
    for info in pkgutil.iter_modules(gora.__path__):
        if info.name in ("bench", "__main__"):
            continue
        module = importlib.import_module(f"gora.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, (dict, list, set)) or type(value).__name__.startswith("WeakKey"):
                contents = list(value.keys()) + list(value.values()) if hasattr(value, "keys") else list(value)
                assert not any(item is state or item is peft_model or isinstance(item, GoraState)
                               for item in contents), f"gora.{info.name}.{name}"


# -- the command line -------------------------------------------------------------------------------------------
def test_gora_export_pad_to_max_rank_and_inspect_print_the_vllm_size(exported, tmp_path, capsys):
    from gora.cli import main

    root, _, state, _ = exported
    state.save(tmp_path / "state")
    size = vllm_max_lora_rank(max(state.ranks.values()))
    assert main(["export", str(root / "base"), str(tmp_path / "state"), "-o", str(tmp_path / "uniform"),
                 "--pad-to-max-rank", "--no-progress"]) == 0
    assert f"uniform-rank portable adapter to {tmp_path / 'uniform'}; " in capsys.readouterr().out
    config = json.loads((tmp_path / "uniform" / "adapter_config.json").read_text())
    assert config["r"] == max(state.ranks.values()) and not config["rank_pattern"]
    for path in (tmp_path / "state", tmp_path / "uniform"):
        assert main(["inspect", str(path), "--no-plot"]) == 0
        assert f"serve with vLLM --max-lora-rank {size} " in capsys.readouterr().out
        assert main(["inspect", str(path), "--no-plot", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["vllm_max_lora_rank"] == size


@pytest.mark.parametrize("form", ["--native", "--merged"])
def test_pad_to_max_rank_with_another_form_is_refused_before_loading(exported, tmp_path, capsys, form):
    from gora.cli import main

    root, _, _, _ = exported
    assert main(["export", str(root / "nowhere"), str(root / "native"), "-o", str(tmp_path / "out"), form,
                 "--pad-to-max-rank"]) == 2
    assert "--pad-to-max-rank pads the portable adapter" in capsys.readouterr().err


# -- vLLM's own adapter-config reader, where it can be imported --------------------------------------------------
@pytest.mark.parametrize("form", ["native", "portable", "uniform"])
def test_vllm_reads_each_form_with_the_ranks_and_scalings_peft_uses(exported, form):
    """vLLM's ``PEFTHelper`` (its reader of adapter_config.json) accepts the export at the printed
    ``--max-lora-rank`` and gives every layer the rank and scaling PEFT gives it. vLLM is not a dependency: its wheel
    is built for CUDA, but this module imports on a CPU machine (``pip install --no-deps vllm`` plus the few
    packages it names); elsewhere the test is skipped."""
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except Exception as error:  # noqa: BLE001 (not installed, or an import that needs a GPU build)
        pytest.skip(f"vLLM's LoRA config reader cannot be imported here: {error!r}")
    from transformers import AutoModelForCausalLM

    root, _, state, _ = exported
    helper = PEFTHelper.from_local_dir(str(root / form), max_position_embeddings=64)
    size = vllm_max_lora_rank(max(state.ranks.values()))
    helper.validate_legal(LoRAConfig(max_lora_rank=size))
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        helper.validate_legal(LoRAConfig(max_lora_rank=VLLM_MAX_LORA_RANKS[VLLM_MAX_LORA_RANKS.index(size) - 1]))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "base")), root / form)
    for name, module in reloaded.base_model.model.named_modules():
        if name in state.adapted:
            rank, scaling = helper.get_rank_and_scaling(name)
            assert rank == module.lora_A["default"].weight.shape[0], (form, name)
            assert scaling == pytest.approx(module.scaling["default"], rel=1e-12), (form, name)


def _sglang_config(directory):
    """SGLang's own reading of adapter_config.json (its ``LoRAConfig``). Its ``LoRAAdapter`` then applies one scaling,
    ``lora_alpha / r``, and stacks q/k/v's lora_A as if every layer had rank ``r`` (sglang/srt/lora/lora.py); that
    module imports torchvision and GPU kernels, so only the config reader runs here."""
    try:
        from sglang.srt.lora.lora_config import LoRAConfig as SGLangLoRAConfig
    except Exception as error:  # noqa: BLE001 (not installed, or an import that needs a GPU build)
        pytest.skip(f"SGLang's LoRA config reader cannot be imported here: {error!r}")
    return SGLangLoRAConfig(str(directory))


def test_sglang_reads_the_uniform_form_with_one_rank_and_peft_s_scaling(exported):
    """The uniform-rank form meets SGLang's two assumptions (one rank ``r`` in every tensor, one scaling
    ``lora_alpha / r`` equal to PEFT's scaling of every layer); the portable form (per-layer ranks) and the native
    form (rsLoRA's α/√r_i per layer) do not, which is what the uniform form is for."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, _, state, _ = exported

    def ranks(form):
        weights = load_file(str(root / form / "adapter_model.safetensors"))
        return {t.shape[0] for k, t in weights.items() if "lora_A" in k} | \
            {t.shape[1] for k, t in weights.items() if "lora_B" in k}

    uniform = _sglang_config(root / "uniform")
    assert ranks("uniform") == {uniform.r} and uniform.target_modules
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "base")), root / "uniform")
    scalings = {m.scaling["default"] for m in reloaded.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {uniform.lora_alpha / uniform.r}
    assert ranks("portable") != {_sglang_config(root / "portable").r}
    native = _sglang_config(root / "native")
    assert {native.lora_alpha / native.r} != {8 / r**0.5 for r in ranks("native")}
