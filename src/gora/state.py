"""``GoraState``: everything estimation produced, saved as JSON + safetensors and loaded back.

The state holds A_i (r_i × in) and C_i = Ḡ_i A_iᵀ(A_i A_iᵀ)⁻¹ (out × r_i) in fp32; B_i = −(γ√in/α)·C_i
is formed at apply time, so γ and α can change without re-estimating.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_directory, sha256_file
from .errors import GoraStateError

FORMAT_VERSION = 1
META_FILE = "gora_state.json"
TENSOR_FILE = "gora_state.safetensors"


@dataclass
class GoraState:
    ranks: dict[str, int]
    """Module name (relative to the base model) → allocated rank; 0 means left un-adapted."""
    importance: dict[str, float]
    """Module name → importance score (layers that got a gradient)."""
    shapes: dict[str, tuple[int, int]]
    """Module name → (out, in) of its weight, PEFT orientation."""
    A: dict[str, Tensor] = field(default_factory=dict)
    """lora_A per adapted layer, (r_i, in), fp32."""
    C: dict[str, Tensor] = field(default_factory=dict)
    """Least-squares factor per adapted layer, (out, r_i), fp32: B = −(γ√in/α)·C."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Matched modules left out, with the reason (``"no gradient"``, tied embeddings, ...)."""
    reference_rank: int = 8
    lora_alpha: float = 16.0
    gamma: float = 5e-2
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    """The ``GoraConfig`` used, as a dict."""
    num_steps: int = 0
    """Estimation steps actually used (summed over processes)."""
    num_samples: int = 0
    budget: int = 0
    """LoRA's parameter count at the reference rank over the estimated layers."""
    actual_params: int = 0
    """Parameters the allocated ranks cost."""
    estimation_seconds: float = 0.0
    peak_memory_bytes: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    model_class: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    """Diagnostics: early stop of adaptive steps, the adaptive-gamma scan, fp16 loss scale."""

    # -- views ----------------------------------------------------------------------------
    @property
    def adapted(self) -> list[str]:
        """Names with rank > 0, sorted."""
        return sorted(name for name, rank in self.ranks.items() if rank > 0)

    def summary(self) -> str:
        """A plain-text rank table with budget and spread."""
        rows = [f"{'module':<60} {'shape':>12} {'rank':>5} {'importance':>11}"]
        for name in sorted(self.ranks):
            out_f, in_f = self.shapes[name]
            imp = self.importance.get(name, float("nan"))
            rows.append(f"{name:<60} {f'{out_f}x{in_f}':>12} {self.ranks[name]:>5} {imp:>11.4g}")
        for name, reason in sorted(self.skipped.items()):
            rows.append(f"{name:<60} {'':>12} {'-':>5}  skipped: {reason}")
        adapted = [self.ranks[n] for n in self.adapted]
        spread = f"ranks {min(adapted)}..{max(adapted)}" if adapted else "no adapted layer"
        rows.append(
            f"budget {self.budget:,} params (LoRA r={self.reference_rank}), actual {self.actual_params:,} "
            f"({self.actual_params / max(self.budget, 1):.1%}); {spread}; "
            f"{self.num_steps} steps, {self.num_samples} samples, gamma={self.gamma:g}"
        )
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
        """Write ``gora_state.json`` + ``gora_state.safetensors`` atomically (temp dir, then rename)."""
        self.validate()
        tensors = {f"A::{n}": self.A[n].detach().float().cpu().contiguous() for n in self.adapted}
        tensors |= {f"C::{n}": self.C[n].detach().float().cpu().contiguous() for n in self.adapted}
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "gora", "version": str(FORMAT_VERSION)})
            meta = self._metadata()
            meta["tensors_sha256"] = sha256_file(tmp / TENSOR_FILE)
            meta["tensors_bytes"] = (tmp / TENSOR_FILE).stat().st_size
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return Path(directory)

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": "gora-state",
            "format_version": FORMAT_VERSION,
            "ranks": self.ranks,
            "importance": self.importance,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "skipped": self.skipped,
            "reference_rank": self.reference_rank,
            "lora_alpha": self.lora_alpha,
            "gamma": self.gamma,
            "seed": self.seed,
            "config": self.config,
            "num_steps": self.num_steps,
            "num_samples": self.num_samples,
            "budget": self.budget,
            "actual_params": self.actual_params,
            "estimation_seconds": self.estimation_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "versions": self.versions,
            "model_class": self.model_class,
            "notes": self.notes,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GoraState":
        """Load a saved state; damaged, truncated or foreign files raise ``GoraStateError``."""
        path = Path(directory)
        meta = _read_metadata(path)
        tensor_path = path / TENSOR_FILE
        if not tensor_path.is_file():
            raise GoraStateError(f"{tensor_path} is missing; the state in {path} is incomplete. Re-run estimate_gora.")
        if tensor_path.stat().st_size != meta["tensors_bytes"] or sha256_file(tensor_path) != meta["tensors_sha256"]:
            raise GoraStateError(
                f"{tensor_path} does not match its checksum in {META_FILE} (truncated or corrupted); "
                "re-run estimate_gora and save the state again."
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise GoraStateError(f"cannot read {tensor_path}: {error}. Re-run estimate_gora.") from error
        try:
            state = cls(
                ranks={str(k): int(v) for k, v in meta["ranks"].items()},
                importance={str(k): float(v) for k, v in meta["importance"].items()},
                shapes={str(k): (int(v[0]), int(v[1])) for k, v in meta["shapes"].items()},
                A={k[3:]: v for k, v in tensors.items() if k.startswith("A::")},
                C={k[3:]: v for k, v in tensors.items() if k.startswith("C::")},
                skipped=dict(meta.get("skipped", {})),
                reference_rank=int(meta["reference_rank"]),
                lora_alpha=float(meta["lora_alpha"]),
                gamma=float(meta["gamma"]),
                seed=int(meta["seed"]),
                config=dict(meta.get("config", {})),
                num_steps=int(meta.get("num_steps", 0)),
                num_samples=int(meta.get("num_samples", 0)),
                budget=int(meta.get("budget", 0)),
                actual_params=int(meta.get("actual_params", 0)),
                estimation_seconds=float(meta.get("estimation_seconds", 0.0)),
                peak_memory_bytes=int(meta.get("peak_memory_bytes", 0)),
                versions=dict(meta.get("versions", {})),
                model_class=str(meta.get("model_class", "")),
                notes=dict(meta.get("notes", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise GoraStateError(f"{path / META_FILE} is malformed ({error!r}); re-run estimate_gora.") from error
        state.validate()
        return state

    def validate(self) -> None:
        """Check internal consistency: every adapted layer has A (r×in) and C (out×r) of finite values."""
        problems = []
        for name, rank in self.ranks.items():
            if name not in self.shapes:
                problems.append(f"{name}: no shape")
                continue
            if rank < 0:
                problems.append(f"{name}: negative rank {rank}")
            if rank <= 0:
                continue
            out_f, in_f = self.shapes[name]
            a, c = self.A.get(name), self.C.get(name)
            if a is None or c is None:
                problems.append(f"{name}: missing A or C")
            elif tuple(a.shape) != (rank, in_f) or tuple(c.shape) != (out_f, rank):
                problems.append(f"{name}: A {tuple(a.shape)} / C {tuple(c.shape)} do not fit rank {rank}, {out_f}x{in_f}")
            elif not (torch.isfinite(a).all() and torch.isfinite(c).all()):
                problems.append(f"{name}: non-finite values")
        if not math.isfinite(self.gamma) or self.gamma < 0:
            problems.append(f"gamma {self.gamma}")
        if problems:
            raise GoraStateError(f"inconsistent GoraState: {'; '.join(problems[:5])}. Re-run estimate_gora.")


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise GoraStateError(f"no GoRA state at {path}: the directory does not exist. Save one with state.save(path).")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise GoraStateError(f"{meta_path} is missing; {path} is not a GoRA state directory (state.save writes it).")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GoraStateError(f"{meta_path} is not valid JSON ({error}); the file is damaged. Re-run estimate_gora.") from error
    if not isinstance(meta, dict) or meta.get("format") != "gora-state":
        raise GoraStateError(f"{meta_path} is not a GoRA state file.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GoraStateError(
            f"{meta_path} has format version {meta.get('format_version')!r}; this gora reads version {FORMAT_VERSION}."
        )
    for key in ("tensors_sha256", "tensors_bytes", "ranks", "shapes"):
        if key not in meta:
            raise GoraStateError(f"{meta_path} lacks {key!r}; the file is damaged. Re-run estimate_gora.")
    return meta
