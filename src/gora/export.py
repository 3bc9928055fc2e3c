"""``export_adapter``: a GoRA model's adapter saved in PEFT's format, and the ``gora_config.json`` sidecar beside it.

Native form: PEFT's own ``save_pretrained`` (``use_rslora=True``, per-layer ``rank_pattern``/``alpha_pattern``).
Portable form: ``r`` = max rank, one global scaling of 1, per-layer scaling folded into ``lora_B``,
``use_rslora=False``: read the same way by vanilla PEFT and vLLM. Uniform-rank form: the portable one zero-padded
to the max rank, for servers that assume one rank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR_FILE, atomic_directory
from .errors import GoraConfigError, GoraStateError, GoraTypeError, GoraUnsupportedError
from .json_fields import flag, integer, mapping, number, read_fields, text
from .peft_compat import inner_model, pattern_keys
from .serving import serving_hint
from .state import GoraState
from .versions import format_version_refusal, package_versions

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1


# -- the adapter's layers ------------------------------------------------------------------------------------
def lora_layers(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, tuple[int, float]]:
    """{module name: (rank, forward scaling)} read off the model's LoRA layers themselves."""
    layers = {}
    for name, module in inner_model(peft_model).named_modules():
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


@dataclass(frozen=True)
class SidecarKey:
    """One key of ``gora_config.json`` besides ``format``, ``format_version``, ``native_scalings`` and ``versions``
    (the export's own, written by ``_write_sidecar``)."""

    state_field: str | None
    """The ``GoraState`` field written under the key when the export knows the state; ``None``: an export setting."""
    check: Callable[[Any], Any] | None = None
    """The check ``read_sidecar`` reads the key back with; ``None``: written for the record, not read back."""


SIDECAR_KEYS: dict[str, SidecarKey] = {
    "ranks": SidecarKey("ranks", mapping(integer)),
    "importance": SidecarKey("importance", mapping(number)),
    "skipped": SidecarKey("skipped", mapping(text)),
    "budget": SidecarKey("budget", integer),
    "actual_params": SidecarKey("actual_params", integer),
    "r": SidecarKey("reference_rank", integer),
    "num_steps": SidecarKey("num_steps", integer),
    "num_samples": SidecarKey("num_samples", integer),
    "gamma": SidecarKey("gamma", number),
    "lora_alpha": SidecarKey("lora_alpha"),
    "gora_config": SidecarKey("config"),
    "seed": SidecarKey("seed"),
    "estimation_versions": SidecarKey("versions"),
    "portable": SidecarKey(None, flag),
    "uniform_rank": SidecarKey(None, flag),
}
"""The sidecar's keys: the one description that ``_write_sidecar`` and ``read_sidecar`` share."""

SIDECAR_FIELDS = {key: spec.check for key, spec in SIDECAR_KEYS.items() if spec.check is not None}
"""The sidecar's fields that ``read_sidecar`` returns, with their checks (``ranks`` is required)."""


def rank_info(state: GoraState) -> dict[str, Any]:
    """The state's values of the keys ``read_sidecar`` returns from an adapter exported with it: ranks,
    importances, skips, budget and estimation (what ``gora inspect`` shows of a state and of an adapter alike)."""
    return {key: getattr(state, spec.state_field) for key, spec in SIDECAR_KEYS.items()
            if spec.state_field is not None and spec.check is not None}


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
        sidecar |= {key: getattr(state, spec.state_field) for key, spec in SIDECAR_KEYS.items()
                    if spec.state_field is not None}
    path.write_text(json.dumps(sidecar, indent=2, sort_keys=True))


def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``gora_config.json`` of an exported adapter, checked: what ``gora inspect`` shows of an adapter.

    Raises:
        GoraStateError: the file is missing, not JSON, of a newer format, or holds values of the wrong type.
    """
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
        raise GoraStateError(format_version_refusal(path, meta.get("format_version"), meta.get("versions"),
                                                    SIDECAR_VERSION, "export the adapter again"))
    try:
        return read_fields(meta, SIDECAR_FIELDS, required=("ranks",))
    except ValueError as error:
        raise GoraStateError(f"{path} is damaged ({error}); export the adapter again.") from None
