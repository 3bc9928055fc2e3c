"""``GoraState``: everything estimation produced, saved as JSON + safetensors and loaded back.

The state holds A_i (r_i × in) and C_i = Ḡ_i A_iᵀ(A_i A_iᵀ)⁻¹ (out × r_i) in fp32; B_i = −(γ√in/α)·C_i
is formed at apply time, so γ and α can change without re-estimating.

The files' schema is the dataclass itself: each field's metadata says where it is stored (a key of
``gora_state.json`` with its check on load, or tensors of ``gora_state.safetensors`` under a key prefix), and save
and load walk ``dataclasses.fields``. The module stays whole for that reason: the fields, the code that writes them
and the code that reads them back are one format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor

from .atomic import (
    META_FILE,
    TENSOR_FILE,
    atomic_directory,
    clean_leftovers,
    interrupted_saves,
    sha256_bytes,
    sha256_file,
)
from .config import field_default
from .errors import GoraStateError, GoraTypeError
from .json_fields import integer, is_shape, json_object, mapping, number, read_fields, shape, text
from .plotting import rank_rows, rank_spread
from .versions import format_version_refusal

FORMAT_VERSION = 1


# -- where each field is stored: the files' schema, in the fields' metadata ------------------------------------
@dataclass(frozen=True)
class InJson:
    """A field stored in ``gora_state.json`` under its own name, as JSON; ``read`` checks it on load."""

    read: Callable[[Any], Any]
    required: bool = False
    """A file without the key is damaged; without ``required``, a missing key gives the field's default (a file
    written before the field existed)."""


@dataclass(frozen=True)
class InTensors:
    """A ``{name: tensor}`` field stored in ``gora_state.safetensors`` as ``prefix + name``."""

    prefix: str
    layer_factors: bool
    """A and C: only the adapted layers' tensors are written, in fp32; else every tensor, in its own dtype."""


STORED = "gora_state"
"""The field-metadata key that holds a field's ``InJson`` or ``InTensors``."""


def _in_json(read: Callable[[Any], Any], *, required: bool = False) -> dict[str, InJson]:
    return {STORED: InJson(read, required)}


def _in_tensors(prefix: str, *, layer_factors: bool) -> dict[str, InTensors]:
    return {STORED: InTensors(prefix, layer_factors)}


@dataclass
class GoraState:
    ranks: dict[str, int] = field(metadata=_in_json(mapping(integer), required=True))
    """Module name (relative to the base model) → allocated rank; 0 means left un-adapted."""
    importance: dict[str, float] = field(metadata=_in_json(mapping(number), required=True))
    """Module name → importance score (layers that got a gradient)."""
    shapes: dict[str, tuple[int, int]] = field(metadata=_in_json(mapping(shape), required=True))
    """Module name → (out, in) of its weight, PEFT orientation (a JSON list)."""
    A: dict[str, Tensor] = field(default_factory=dict, metadata=_in_tensors("A::", layer_factors=True))
    """lora_A per adapted layer, (r_i, in), fp32."""
    C: dict[str, Tensor] = field(default_factory=dict, metadata=_in_tensors("C::", layer_factors=True))
    """Least-squares factor per adapted layer, (out, r_i), fp32: B = −(γ√in/α)·C."""
    skipped: dict[str, str] = field(default_factory=dict, metadata=_in_json(mapping(text)))
    """Matched modules left out, with the reason (``"no gradient"``, tied embeddings, ...)."""
    reference_rank: int = field(default=8, metadata=_in_json(partial(integer, minimum=1), required=True))
    lora_alpha: float = field(default=16.0, metadata=_in_json(partial(number, positive=True), required=True))
    gamma: float = field(default=field_default("gamma"), metadata=_in_json(number, required=True))
    seed: int = field(default=0, metadata=_in_json(integer, required=True))
    config: dict[str, Any] = field(default_factory=dict, metadata=_in_json(json_object))
    """The ``GoraConfig`` used, as a dict."""
    num_steps: int = field(default=0, metadata=_in_json(integer))
    """Estimation steps actually used (summed over processes)."""
    num_samples: int = field(default=0, metadata=_in_json(integer))
    budget: int = field(default=0, metadata=_in_json(integer))
    """LoRA's parameter count at the reference rank over the estimated layers."""
    actual_params: int = field(default=0, metadata=_in_json(integer))
    """Parameters the allocated ranks cost."""
    estimation_seconds: float = field(default=0.0, metadata=_in_json(number))
    peak_memory_bytes: int = field(default=0, metadata=_in_json(integer))
    versions: dict[str, str] = field(default_factory=dict, metadata=_in_json(mapping(text)))
    model_class: str = field(default="", metadata=_in_json(text))
    notes: dict[str, Any] = field(default_factory=dict, metadata=_in_json(json_object))
    """Diagnostics: early stop of adaptive steps, the adaptive-gamma scan, fp16 loss scale."""
    init_stats: dict[str, Any] = field(default_factory=dict, metadata=_in_json(json_object))
    """The initial step: ``relative_delta`` (‖ΔW₀‖_F/‖W₀‖_F over adapted layers), ``per_layer``, ``loss_w0`` and
    ``loss_after`` (held-out loss at W₀ and after initialisation; None without held-out batches), ``loss_se``,
    ``gamma``. Empty for states saved before these diagnostics existed."""
    head: dict[str, Tensor] = field(default_factory=dict, metadata=_in_tensors("H::", layer_factors=False))
    """The warmed head (``GoraConfig.head_warmup_steps``): parameter name (relative to the base model) → tensor,
    in the parameter's dtype; ``apply_gora`` copies it into PEFT's trainable copy. Empty without warm-up."""

    # -- views ----------------------------------------------------------------------------
    @property
    def adapted(self) -> list[str]:
        """Names with rank > 0, sorted."""
        return sorted(name for name, rank in self.ranks.items() if rank > 0)

    def summary(self) -> str:
        """A plain-text rank table with budget and spread."""
        rows = rank_rows(self.ranks, self.importance, self.shapes, self.skipped)
        rows.append(
            f"budget {self.budget:,} params (LoRA r={self.reference_rank}), actual {self.actual_params:,} "
            f"({self.actual_params / max(self.budget, 1):.1%}); {rank_spread(self.ranks.values())}; "
            f"{self.num_steps} steps, {self.num_samples} samples, gamma={self.gamma:g}"
        )
        from .diagnostics import describe  # the initial step's size and held-out loss change, when recorded

        if describe(self.init_stats):
            rows.append(describe(self.init_stats))
        return "\n".join(rows)

    def __repr__(self) -> str:
        adapted = [self.ranks[n] for n in self.adapted]
        spread = f"{min(adapted)}..{max(adapted)}" if adapted else "-"
        return (
            f"GoraState(layers={len(self.ranks)}, adapted={len(adapted)}, ranks={spread}, "
            f"budget={self.budget}, actual_params={self.actual_params}, steps={self.num_steps})"
        )

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gora_state.json`` + ``gora_state.safetensors`` atomically (temp dir, then rename).

        Both files are checksummed (SHA-256 of the tensor file, and of the metadata itself), so any
        later damage is detected by ``load``. An interrupted save leaves ``directory`` as it was.

        Raises:
            GoraStateError: the state is inconsistent, holds notes or a config that are not JSON,
                ``directory`` is a file or a directory with other content, or the files cannot be written (disk
                full: the message names the path; a previous state there stays intact).
        """
        self.validate()
        meta = self._metadata()
        try:  # serialise before writing anything: a bad note must not cost a half-written directory
            json.dumps(meta)
        except (TypeError, ValueError, RecursionError) as error:
            raise GoraStateError(f"the state's config or notes cannot be written as JSON ({error}).") from None
        tensors = self._tensors()
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "gora", "version": str(FORMAT_VERSION)})
            meta["tensors_sha256"] = sha256_file(tmp / TENSOR_FILE)
            meta["tensors_bytes"] = (tmp / TENSOR_FILE).stat().st_size
            meta["meta_sha256"] = _metadata_checksum(meta)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(directory)

    def _metadata(self) -> dict[str, Any]:
        """The JSON fields, under their own names, after the format's header (checksums are added by ``save``)."""
        meta: dict[str, Any] = {"format": "gora-state", "format_version": FORMAT_VERSION}
        return meta | {spec.name: getattr(self, spec.name) for spec, _ in _stored(InJson)}

    def _tensors(self) -> dict[str, Tensor]:
        """The tensor fields, each name under its field's prefix, on the CPU."""
        tensors: dict[str, Tensor] = {}
        for spec, where in _stored(InTensors):
            values: dict[str, Tensor] = getattr(self, spec.name)
            if where.layer_factors:
                tensors |= {where.prefix + n: values[n].detach().float().cpu().contiguous() for n in self.adapted}
            else:
                tensors |= {where.prefix + n: t.detach().cpu().contiguous() for n, t in values.items()}
        return tensors

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GoraState:
        """Load a saved state.

        Directories that saves killed mid-way left beside ``directory`` (``.NAME.tmp-*``, and ``.NAME.old-*`` once
        the state here is complete) are removed; they are never read as the state.

        Raises:
            GoraStateError: the directory is missing, a file is missing, truncated or corrupted (size or
                SHA-256 mismatch), or the content is malformed or inconsistent. Nothing else.
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise GoraTypeError(f"GoraState.load needs the path of a saved state, got {type(directory).__name__}.")
        path = Path(directory)
        try:
            meta = _read_metadata(path)
        except OSError as error:  # e.g. a directory that may not be listed: no stray PermissionError
            raise GoraStateError(f"cannot read {path} ({error.strerror or error}); check the path and its "
                                 "permissions.") from None
        tensors = _read_tensors(path / TENSOR_FILE, meta)
        values: dict[str, Any] = {}
        for spec, where in _stored(InTensors):
            values[spec.name] = {k[len(where.prefix):]: v for k, v in tensors.items() if k.startswith(where.prefix)}
        try:  # a key the file lacks gives the field's default (required keys were checked by _read_metadata)
            values |= read_fields(meta, {spec.name: where.read for spec, where in _stored(InJson)})
        except ValueError as error:
            raise GoraStateError(f"{path / META_FILE} is malformed ({error}); re-run estimate_gora.") from None
        state = cls(**values)
        factors = {name for spec, where in _stored(InTensors) if where.layer_factors for name in values[spec.name]}
        unexpected = sorted(factors - set(state.adapted))
        if unexpected:
            raise GoraStateError(f"{path / TENSOR_FILE} holds tensors for {unexpected[:5]}, which the state does "
                                 "not adapt; the files do not belong together. Re-run estimate_gora.")
        state.validate()
        clean_leftovers(path)  # what saves killed mid-way left beside this complete state
        return state

    def validate(self) -> None:
        """Check internal consistency: every adapted layer has A (r×in) and C (out×r) of finite fp32 values.

        Raises:
            GoraStateError: naming the first inconsistencies found.
        """
        problems = []
        for name, rank in self.ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int):
                problems.append(f"{name}: rank {rank!r} is not an integer")
                continue
            dims = self.shapes.get(name)
            if not is_shape(dims):
                problems.append(f"{name}: no (out, in) shape" if dims is None else f"{name}: bad shape {dims!r}")
                continue
            if rank < 0:
                problems.append(f"{name}: negative rank {rank}")
            if rank <= 0:
                continue
            out_f, in_f = dims  # type: ignore[misc]  # None was reported and skipped above
            a, c = self.A.get(name), self.C.get(name)
            if not isinstance(a, Tensor) or not isinstance(c, Tensor):
                problems.append(f"{name}: missing A or C")
            elif tuple(a.shape) != (rank, in_f) or tuple(c.shape) != (out_f, rank):
                problems.append(
                    f"{name}: A {tuple(a.shape)} / C {tuple(c.shape)} do not fit rank {rank}, {out_f}x{in_f}")
            elif not (a.is_floating_point() and c.is_floating_point()):
                problems.append(f"{name}: A and C must be floating point, got {a.dtype} / {c.dtype}")
            elif not (torch.isfinite(a).all() and torch.isfinite(c).all()):
                problems.append(f"{name}: non-finite values")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not math.isfinite(self.gamma) \
                or self.gamma < 0:
            problems.append(f"gamma {self.gamma!r} is not a finite number >= 0")
        for name, tensor in self.head.items():  # the warmed head
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                problems.append(f"head {name}: not a finite floating-point tensor")
        if problems:
            raise GoraStateError(f"inconsistent GoraState: {'; '.join(problems[:5])}. Re-run estimate_gora.")


# -- the schema, read off the fields --------------------------------------------------------------------------
def _stored(kind: type[InJson] | type[InTensors]) -> list[tuple[dataclasses.Field, Any]]:
    """GoraState's fields stored as ``kind``, each with its ``InJson`` or ``InTensors``: the schema of the files."""
    return [(spec, spec.metadata[STORED]) for spec in dataclasses.fields(GoraState)
            if isinstance(spec.metadata[STORED], kind)]


REQUIRED_KEYS = ("meta_sha256", "tensors_sha256", "tensors_bytes",
                 *(spec.name for spec, where in _stored(InJson) if where.required))
"""The keys without which ``gora_state.json`` is damaged: its checksums and the required fields."""


# -- reading, strictly: a damaged file gives GoraStateError, never a stray KeyError or TypeError ----------------
def _metadata_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata (without this checksum) in a canonical JSON form, independent of layout."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    canonical = json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"))
    return sha256_bytes(canonical.encode())


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        hint = "Save one with state.save(path)."
        clean_leftovers(path)  # unfinished saves go; a backup (the only complete copy) stays
        earlier = interrupted_saves(path)
        if earlier:
            hint = (f"A save was interrupted while swapping directories; the previous complete state is at "
                    f"{earlier[-1]}: rename it to {path}.")
        raise GoraStateError(f"no GoRA state at {path}: the path {what}. {hint}")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise GoraStateError(f"{meta_path} is missing; {path} is not a GoRA state directory (state.save writes it).")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise GoraStateError(f"{meta_path} cannot be read as JSON ({error}); the file is damaged or truncated. "
                             "Re-run estimate_gora.") from None
    if not isinstance(meta, dict) or meta.get("format") != "gora-state":
        raise GoraStateError(f"{meta_path} is not a GoRA state file.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GoraStateError(format_version_refusal(meta_path, meta.get("format_version"), meta.get("versions"),
                                                    FORMAT_VERSION, "re-run estimate_gora"))
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise GoraStateError(f"{meta_path} lacks {key!r}; the file is damaged. Re-run estimate_gora.")
    try:
        intact = meta["meta_sha256"] == _metadata_checksum(meta)
    except (TypeError, ValueError, RecursionError):
        intact = False
    if not intact:
        raise GoraStateError(f"{meta_path} does not match its own checksum (edited or corrupted); "
                             "re-run estimate_gora and save the state again.")
    return meta


def _read_tensors(tensor_path: Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a state, read once and checked against the size and SHA-256 in the metadata."""
    if not tensor_path.is_file():
        raise GoraStateError(f"{tensor_path} is missing; the state in {tensor_path.parent} is incomplete. "
                             "Re-run estimate_gora.")
    try:
        data = tensor_path.read_bytes()
    except OSError as error:
        raise GoraStateError(f"cannot read {tensor_path}: {error}.") from None
    if len(data) != meta["tensors_bytes"] or sha256_bytes(data) != meta["tensors_sha256"]:
        raise GoraStateError(
            f"{tensor_path} does not match its size and checksum in {META_FILE} (truncated or corrupted); "
            "re-run estimate_gora and save the state again."
        )
    try:
        return safetensors_load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        raise GoraStateError(f"cannot read {tensor_path}: {error}. Re-run estimate_gora.") from None
