"""From a ``GoraState`` to a plain ``peft.PeftModel``, and portable export.

Native model: the user's LoraConfig with ``use_rslora=True``, exact target names, and
``rank_pattern``/``alpha_pattern`` per layer; PEFT builds the layers, gora copies A and B in.
Portable export: ``r`` = max rank, one global scaling of 1, per-layer scaling folded into
``lora_B``, ``use_rslora=False``: read the same way by vanilla PEFT and vLLM.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR_FILE, atomic_directory
from .config import check_lora_config
from .errors import GoraConfigError, GoraStateError, GoraTargetError, GoraTypeError, GoraUnsupportedError
from .head_warmup import check_head_fits, copy_head_into
from .initialization import b_from_c
from .peft_compat import expanded_lora_config, is_target, refuse_adapter_layers
from .serving import serving_hint
from .state import GoraState
from .targets import _describe, unwrap_model
from .versions import package_versions

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1


# -- naming ----------------------------------------------------------------------------------
def pattern_keys(names: list[str]) -> dict[str, str]:
    """rank_pattern key per exact name. PEFT matches keys as ``(.*\\.)?key$``, so a name that is a
    dotted suffix of another target would also match it: anchor such a key with ``^``."""
    keys = {}
    for name in names:
        shadows = any(other != name and other.endswith("." + name) for other in names)
        keys[name] = f"^{name}" if shadows else name
    return keys


def target_modules_for(base: nn.Module, names: list[str]) -> list[str] | str:
    """Exact names; a full-match regex only when a name is a dotted suffix of a module we must not adapt."""
    chosen = set(names)
    collides = any(
        other not in chosen and any(other.endswith("." + name) for name in names)
        for other, _ in base.named_modules()
    )
    if not collides:
        return sorted(names)
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def native_lora_config(lora_config: LoraConfig, state: GoraState, base: nn.Module) -> LoraConfig:
    """The LoraConfig PEFT builds GoRA's model from (only rank > 0 modules targeted)."""
    config = copy.deepcopy(lora_config)
    names = state.adapted
    keys = pattern_keys(names)
    config.target_modules = target_modules_for(base, names)
    config.rank_pattern = {keys[n]: state.ranks[n] for n in names}
    config.alpha_pattern = {keys[n]: config.lora_alpha for n in names}
    config.use_rslora = True
    config.init_lora_weights = True
    config.layers_to_transform = None
    config.layers_pattern = None
    return config


# -- checks ------------------------------------------------------------------------------------
def check_not_wrapped(model: nn.Module) -> None:
    """Refuse what ``get_peft_model`` must not wrap: a PeftModel, or a model inside a DDP/FSDP wrapper."""
    if isinstance(model, PeftModel):
        raise GoraTargetError("model is already a PeftModel; pass a freshly loaded base model, or "
                              "peft_model.unload() (the base model without its adapters).")
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel, FullyShardedDataParallel)):
        raise GoraTargetError(
            f"model is wrapped in {type(model).__name__}; apply GoRA to the model itself (wrapper.module) and wrap "
            "the PeftModel afterwards (e.g. accelerator.prepare(peft_model)), since the trainable parameters change."
        )


def check_state_fits(base: nn.Module, state: GoraState) -> None:
    """Refuse a state written for another model: every adapted name must exist with the same shape."""
    state.validate()
    modules = dict(base.named_modules())
    problems = []
    for name in state.adapted:
        module = modules.get(name)
        if module is None:
            problems.append(f"{name!r} does not exist")
            continue
        try:
            shape = _describe(module, name).shape
        except GoraUnsupportedError:
            problems.append(f"{name!r} is a {type(module).__name__}, not a linear layer")
            continue
        if shape != tuple(state.shapes[name]):
            problems.append(f"{name!r} is {shape[0]}x{shape[1]}, the state has {state.shapes[name]}")
    if problems:
        raise GoraStateError(
            f"this GoraState does not fit the model ({len(problems)} problems: {'; '.join(problems[:4])}). "
            f"It was estimated on a {state.model_class or 'different model'}; estimate again on this model."
        )


# -- apply -------------------------------------------------------------------------------------
def apply_gora(
    model: nn.Module, lora_config: LoraConfig, state: GoraState, *, gamma: float | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` whose adapters start at GoRA's initialisation.

    Each adapted layer gets rank ``state.ranks[name]``, scaling α/√r_i, A_i from the state and
    B_i = −(γ√in/α)·C_i, so ΔW₀ = −γ√(in/r_i)·Ḡ_i P_{A_i}. Base weights are never modified.
    ``gamma`` overrides the state's γ (B is linear in γ: no re-estimation needed).

    The returned model carries the state as ``peft_model.gora_state`` (a plain attribute, read by
    :func:`export_adapter` and usable with ``add_gora_logging``). It is not saved by ``save_pretrained``: after
    ``PeftModel.from_pretrained``, pass ``state=GoraState.load(...)`` where it is needed; an exported adapter's
    ``gora_config.json`` keeps the state's ranks, importances and budget for ``gora inspect``.

    Raises:
        GoraStateError: the state does not fit the model (checked before the model is touched).
    """
    check_lora_config(lora_config)
    if not isinstance(state, GoraState):
        raise GoraTypeError(f"state must be a GoraState, got {type(state).__name__}; "
                            "load a saved one with GoraState.load(directory).")
    check_not_wrapped(model)
    if not state.adapted:
        raise GoraStateError("the state adapts no layer (every rank is 0); lower min_rank or check the targets.")
    if lora_config.use_dora:
        raise GoraUnsupportedError("GoRA initialises plain LoRA adapters; set use_dora=False.")
    base = unwrap_model(model)
    refuse_adapter_layers(base)  # e.g. the base model of an earlier apply_gora: LoRA is inside it already
    check_state_fits(base, state)
    check_head_fits(base, lora_config, state.head)
    gamma = state.gamma if gamma is None else float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise GoraStateError(f"gamma must be a finite number >= 0, got {gamma}.")
    if lora_config.r != state.reference_rank:
        logger.warning("LoraConfig.r=%d differs from the state's reference rank %d; the state's ranks are used.",
                       lora_config.r, state.reference_rank)
    _warn_other_targets(base, lora_config, state)
    alpha = float(lora_config.lora_alpha)
    weights = {n: (state.A[n], b_from_c(state.C[n], gamma, state.shapes[n][1], alpha)) for n in state.adapted}
    config = native_lora_config(lora_config, state, base)
    restore = _snapshot(model)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        _copy_adapter_weights(peft_model, weights, adapter_name)
        copy_head_into(peft_model, lora_config, state.head, adapter_name)  # the warmed head, into PEFT's copy
    except BaseException:
        restore()  # put the user's model back as it was (PEFT's unload keeps modules_to_save copies)
        raise
    peft_model.gora_state = state  # type: ignore[assignment]  # documented attribute (mypy: Module attrs are tensors)
    return peft_model


def _warn_other_targets(base: nn.Module, lora_config: LoraConfig, state: GoraState) -> None:
    """The state's layers are adapted whatever ``target_modules`` says: say so when the two disagree.

    Matched with PEFT's rule directly, not ``resolve_targets``: that refuses quantised layers, and QGoRA applies a
    state to a quantised model."""
    config = expanded_lora_config(base, lora_config)
    unmatched = [name for name in state.adapted if not is_target(config, name)]
    unknown = [name for name, module in base.named_modules()
               if name and isinstance(module, (nn.Linear, Conv1D)) and is_target(config, name)
               and name not in state.ranks and name not in state.skipped]
    if unmatched or unknown:
        example = (unmatched or unknown)[0]
        logger.warning("LoraConfig.target_modules=%r differs from the state's targets (%d adapted layers it does not "
                       "match, %d matched layers the state never estimated; e.g. %r): the state's %d layers are "
                       "adapted, as estimated. Estimate again to adapt other layers.", lora_config.target_modules,
                       len(unmatched), len(unknown), example, len(state.adapted))


def _snapshot(model: nn.Module):
    """A function that undoes get_peft_model's in-place surgery: child modules, attributes it adds
    (``peft_config``), requires_grad flags and train/eval modes."""
    children = [(module, dict(module._modules), set(vars(module))) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]

    def restore() -> None:
        for module, saved, attributes in children:
            module._modules.clear()
            module._modules.update(saved)
            for added in set(vars(module)) - attributes:
                delattr(module, added)
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode

    return restore


def _inner_model(peft_model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``peft_model.base_model.model``)."""
    return cast(nn.Module, cast(nn.Module, peft_model.base_model).model)


def _copy_adapter_weights(peft_model: PeftModel, weights: dict, adapter_name: str) -> None:
    modules = dict(_inner_model(peft_model).named_modules())
    for name, (a, b) in weights.items():
        layer = modules[name]
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if lora_a.shape != a.shape or lora_b.shape != b.shape:
            raise GoraStateError(f"PEFT built {name!r} with A {tuple(lora_a.shape)} B {tuple(lora_b.shape)}, "
                                 f"expected {tuple(a.shape)} and {tuple(b.shape)} (rank_pattern not applied).")
        with torch.no_grad():
            lora_a.copy_(a.to(device=lora_a.device, dtype=lora_a.dtype))
            lora_b.copy_(b.to(device=lora_b.device, dtype=lora_b.dtype))


# -- export ------------------------------------------------------------------------------------
def lora_layers(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, tuple[int, float]]:
    """{module name: (rank, forward scaling)} read off the model's LoRA layers themselves."""
    layers = {}
    for name, module in _inner_model(peft_model).named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            rank = int(cast(nn.Linear, lora_a[adapter_name]).weight.shape[0])
            layers[name] = (rank, float(cast(dict, module.scaling)[adapter_name]))
    return layers


def export_adapter(
    peft_model: PeftModel, path: str | os.PathLike, portable: bool = True, *, pad_to_max_rank: bool = False,
    state: GoraState | None = None, adapter_name: str = "default",
) -> Path:
    """Save the adapter; ``portable=True`` writes the form vanilla PEFT and vLLM read the same way.

    Portable: ``r`` = max rank, ``lora_alpha`` = ``r`` (global scaling 1), ``rank_pattern`` and
    ``alpha_pattern`` = r_i, ``use_rslora=False``, each ``lora_B`` multiplied by its native scaling
    (α/√r_i) in fp32. ``pad_to_max_rank=True`` (with ``portable``) also zero-pads every layer's ``lora_A`` rows and
    ``lora_B`` columns to the max rank and writes no ``rank_pattern``/``alpha_pattern``: one rank and one scaling
    for every layer, the form servers that assume a global rank read (SGLang; vLLM ≤ 0.31), with the same outputs.
    All forms add a ``gora_config.json`` sidecar (ignored by PEFT and vLLM). The write is atomic: ``path`` is
    replaced only when everything is written.

    Args:
        state: the GoraState the model was built from, for the sidecar (ranks, importances, budget); default
            ``peft_model.gora_state``, which :func:`apply_gora` sets. Without either, the sidecar holds the ranks
            read off the model's layers.
    """
    if not isinstance(peft_model, PeftModel):
        raise GoraTypeError(f"export_adapter needs a peft.PeftModel (from apply_gora or get_gora_model), "
                            f"got {type(peft_model).__name__}.")
    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, LoraConfig):
        raise GoraUnsupportedError(f"adapter {adapter_name!r} is not a LoRA adapter; nothing to export.")
    if portable and config.use_dora:
        raise GoraUnsupportedError("DoRA adapters have no portable rsLoRA-free form; export with portable=False.")
    if pad_to_max_rank and not portable:
        raise GoraConfigError("pad_to_max_rank=True pads the portable form (one global scaling); pass portable=True, "
                              "or leave pad_to_max_rank False for the native form.")
    if state is not None and not isinstance(state, GoraState):
        raise GoraTypeError(f"state must be a GoraState or None, got {type(state).__name__}.")
    state = state if state is not None else getattr(peft_model, "gora_state", None)
    layers = lora_layers(peft_model, adapter_name)
    with atomic_directory(path) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
        saved = tmp if adapter_name == "default" else tmp / adapter_name
        if portable:
            _make_portable(saved, layers, pad_to_max_rank)
            if config.modules_to_save:
                logger.warning("the adapter carries modules_to_save %s: vanilla PEFT needs them, vLLM rejects them.",
                               sorted(config.modules_to_save))
        logger.warning("exported adapter with %s", serving_hint(max(r for r, _ in layers.values())))
        _write_sidecar(saved / SIDECAR_FILE, layers, state, portable, pad_to_max_rank)
    return Path(path)


def _make_portable(directory: Path, layers: dict[str, tuple[int, float]], pad: bool) -> None:
    r_max = max(rank for rank, _ in layers.values())
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    for key, tensor in weights.items():
        if key.endswith(".lora_B.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            tensor = (tensor.double() * layers[name][1]).to(tensor.dtype)  # fold α/√r_i into B
            if pad:  # zero columns: B_pad A_pad = B A
                tensor = torch.nn.functional.pad(tensor, (0, r_max - tensor.shape[1]))
        elif pad and key.endswith(".lora_A.weight"):  # zero rows
            tensor = torch.nn.functional.pad(tensor, (0, 0, 0, r_max - tensor.shape[0]))
        weights[key] = tensor.contiguous()
    save_file(weights, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    keys = pattern_keys(sorted(layers))
    config.update(r=r_max, lora_alpha=r_max, use_rslora=False, init_lora_weights=True,
                  rank_pattern={} if pad else {keys[n]: rank for n, (rank, _) in layers.items()},
                  alpha_pattern={} if pad else {keys[n]: rank for n, (rank, _) in layers.items()})  # alpha_i/r_i = 1
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _write_sidecar(path: Path, layers: dict, state: GoraState | None, portable: bool, uniform_rank: bool) -> None:
    sidecar: dict[str, Any] = {
        "format": "gora-adapter",
        "format_version": SIDECAR_VERSION,
        "portable": portable,
        "uniform_rank": uniform_rank,
        "native_scalings": {n: s for n, (_, s) in sorted(layers.items())},
        "versions": package_versions(),
    }
    if state is None:
        sidecar["ranks"] = {n: r for n, (r, _) in sorted(layers.items())}
    else:
        sidecar |= {
            "ranks": dict(sorted(state.ranks.items())), "importance": dict(sorted(state.importance.items())),
            "skipped": state.skipped, "budget": state.budget, "actual_params": state.actual_params,
            "r": state.reference_rank, "lora_alpha": state.lora_alpha, "gamma": state.gamma,
            "gora_config": state.config, "num_steps": state.num_steps, "num_samples": state.num_samples,
            "seed": state.seed, "estimation_versions": state.versions,
        }
    path.write_text(json.dumps(sidecar, indent=2, sort_keys=True))


def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``gora_config.json`` of an exported adapter, checked: what ``gora inspect`` shows of an adapter.

    Raises:
        GoraStateError: the file is missing, not JSON, of a newer format, or holds values of the wrong type.
    """
    from .state import _version_refusal

    path = Path(directory) / SIDECAR_FILE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise GoraStateError(f"{path} is missing; {path.parent} is not an adapter written by export_adapter "
                             "(gora export).") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise GoraStateError(f"{path} cannot be read as JSON ({error}); export the adapter again.") from None
    if not isinstance(meta, dict) or meta.get("format") != "gora-adapter":
        raise GoraStateError(f"{path} is not a gora adapter sidecar; export the adapter again.")
    if meta.get("format_version") != SIDECAR_VERSION:
        raise GoraStateError(_version_refusal(path, meta.get("format_version"), meta.get("versions"),
                                              SIDECAR_VERSION, "export the adapter again"))
    try:
        checked: dict[str, Any] = {"ranks": _mapping(meta["ranks"], _count)}
        for key, read in (("importance", lambda v: _mapping(v, _number)), ("skipped", lambda v: _mapping(v, _text)),
                          ("budget", _count), ("actual_params", _count), ("r", _count), ("num_steps", _count),
                          ("num_samples", _count), ("gamma", _number), ("portable", _flag),
                          ("uniform_rank", _flag)):
            if key in meta:
                checked[key] = read(meta[key])
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise GoraStateError(f"{path} is damaged ({error}); export the adapter again.") from None
    return checked


def _mapping(value: Any, read) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {value!r}")
    return {str(k): read(v) for k, v in value.items()}


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value
