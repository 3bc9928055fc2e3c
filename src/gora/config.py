"""``GoraConfig``: GoRA's own settings. LoRA's stay in ``peft.LoraConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import GoraConfigError

Importance = Literal["mean_abs", "frobenius", "grad_nuclear"]
Features = Literal["identity", "sqrt"]
Estimator = Literal["full", "sketch"]

IMPORTANCE_NAMES = ("mean_abs", "frobenius", "grad_nuclear")
FEATURE_NAMES = ("identity", "sqrt")
ESTIMATOR_NAMES = ("full", "sketch")


def default_gamma_grid() -> list[float]:
    """Geometric grid 1, 0.8, 0.64, ... down to 1e-5 (52 values), as in the paper's adaptive γ."""
    grid, value = [], 1.0
    while value >= 1e-5:
        grid.append(value)
        value *= 0.8
    return grid


@dataclass
class GoraConfig:
    """Settings of GoRA's estimation, allocation and initialisation.

    The reference rank ``r`` and ``lora_alpha`` come from the ``LoraConfig`` this is used with.
    """

    num_steps: int = 32
    """Batches used to estimate the gradient at W0 (per process under torch.distributed)."""
    min_rank: int | None = None
    """Smallest per-layer rank; ``None`` means ``max(1, r // 2)``. 0 is legal: such layers stay un-adapted."""
    max_rank: int | None = None
    """Largest per-layer rank; ``None`` means ``4 * r``."""
    gamma: float = 5e-2
    """Size of the initial descent step: ||ΔW0||_F ≈ gamma * ||Ḡ||_F."""
    importance: Importance = "mean_abs"
    """Layer score: ``mean_abs`` mean|W⊙Ḡ|, ``frobenius`` ||W⊙Ḡ||_F, ``grad_nuclear`` ||Ḡ||_*."""
    features: Features = "identity"
    """Cost of one rank unit: ``identity`` in+out (LoRA's parameter count), ``sqrt`` sqrt(in+out) (paper text)."""
    seed: int = 0
    """Seed of the per-layer generators that draw A (same seed, same A on every machine)."""
    offload: bool | None = None
    """Keep fp32 accumulators on the CPU. ``None``: on the model's device if 4 B per target parameter fits."""
    estimator: Estimator = "full"
    """``full`` accumulates Ḡ; ``sketch`` accumulates Ḡ·A_maxᵀ only (needs ``importance='frobenius'``)."""
    sketch_dim: int = 32
    """Columns k of the Gaussian test matrix that sketches ||W⊙Ḡ||_F in the sketch path."""
    adaptive_steps: bool = False
    """Stop before ``num_steps`` once every layer's importance moves less than ``convergence_threshold``."""
    convergence_threshold: float = 0.1
    """Relative importance change under which a layer counts as converged (adaptive steps)."""
    min_steps: int = 3
    """Fewest steps before adaptive steps may stop."""
    adaptive_gamma: bool = False
    """Choose gamma on held-out batches (eval mode, against the W0 loss); 0 when nothing beats W0."""
    gamma_grid: list[float] | None = None
    """Candidates for adaptive gamma; ``None`` means 1, 0.8, 0.64, ... down to 1e-5."""
    gamma_batches: int = 4
    """Held-out batches (taken after the first ``num_steps``) that score adaptive gamma."""
    train_mode: bool = False
    """Run estimation in train mode (dropout on), as the official code does. Default keeps the model's mode."""
    gradient_checkpointing: bool = False
    """Enable the model's gradient checkpointing during estimation (restored afterwards)."""
    fp16_loss_scale: float = 1024.0
    """Initial loss scale for fp16 models; halved and the step redone on overflow."""
    show_progress: bool = True
    """Show tqdm progress bars on long steps."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes kept with the state (never read by gora)."""

    def __post_init__(self) -> None:
        self._check_int("num_steps", self.num_steps, minimum=1)
        # check None, not truthiness: min_rank = 0 is legal
        if self.min_rank is not None:
            self._check_int("min_rank", self.min_rank, minimum=0)
        if self.max_rank is not None:
            self._check_int("max_rank", self.max_rank, minimum=1)
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise GoraConfigError(
                f"min_rank ({self.min_rank}) is larger than max_rank ({self.max_rank}); "
                "pass min_rank <= max_rank, or None for the defaults max(1, r // 2) and 4 * r."
            )
        self._check_float("gamma", self.gamma, minimum=0.0)
        self._check_choice("importance", self.importance, IMPORTANCE_NAMES)
        self._check_choice("features", self.features, FEATURE_NAMES)
        self._check_choice("estimator", self.estimator, ESTIMATOR_NAMES)
        if self.estimator == "sketch" and self.importance != "frobenius":
            raise GoraConfigError(
                f"estimator='sketch' keeps no full gradient, so importance={self.importance!r} cannot be computed; "
                "pass importance='frobenius' with the sketch estimator, or estimator='full'."
            )
        if self.offload is not None and not isinstance(self.offload, bool):
            raise GoraConfigError(f"offload must be True, False or None (automatic), got {self.offload!r}.")
        self._check_int("seed", self.seed, minimum=0)
        self._check_int("sketch_dim", self.sketch_dim, minimum=1)
        self._check_int("min_steps", self.min_steps, minimum=1)
        self._check_int("gamma_batches", self.gamma_batches, minimum=1)
        self._check_float("convergence_threshold", self.convergence_threshold, minimum=0.0)
        self._check_float("fp16_loss_scale", self.fp16_loss_scale, minimum=1.0)
        if self.gamma_grid is not None:
            if len(self.gamma_grid) == 0:
                raise GoraConfigError("gamma_grid is empty; pass candidate gammas > 0, or None for the default grid.")
            for value in self.gamma_grid:
                self._check_float("gamma_grid entry", value, minimum=0.0)

    # -- validation helpers -------------------------------------------------------------
    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise GoraConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        if value < minimum:
            raise GoraConfigError(f"{name} must be >= {minimum}, got {value}.")

    @staticmethod
    def _check_float(name: str, value: Any, minimum: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GoraConfigError(f"{name} must be a number, got {value!r}.")
        if not (value >= minimum) or value != value or value == float("inf"):
            raise GoraConfigError(f"{name} must be a finite number >= {minimum}, got {value}.")

    @staticmethod
    def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise GoraConfigError(f"{name}={value!r} is not known; choose one of {', '.join(choices)}.")

    # -- derived values -----------------------------------------------------------------
    def rank_bounds(self, reference_rank: int) -> tuple[int, int]:
        """(min_rank, max_rank) with the defaults resolved against LoRA's reference rank r."""
        if isinstance(reference_rank, bool) or not isinstance(reference_rank, int) or reference_rank < 1:
            raise GoraConfigError(f"LoraConfig.r must be a positive integer, got {reference_rank!r}.")
        min_rank = max(1, reference_rank // 2) if self.min_rank is None else self.min_rank
        max_rank = 4 * reference_rank if self.max_rank is None else self.max_rank
        if min_rank > max_rank:
            raise GoraConfigError(
                f"with r={reference_rank} the rank range is [{min_rank}, {max_rank}], which is empty; "
                "set min_rank and max_rank explicitly."
            )
        return min_rank, max_rank

    def resolved_gamma_grid(self) -> list[float]:
        return list(self.gamma_grid) if self.gamma_grid is not None else default_gamma_grid()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GoraConfigError(f"unknown GoraConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)
