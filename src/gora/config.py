"""``GoraConfig``: GoRA's own settings. LoRA's stay in ``peft.LoraConfig``.

Over 300 lines on purpose: each field carries its documentation and its check here, the one place that states a
default (the CLI's options and their help are generated from it), so the length is the settings' documentation.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import GoraConfigError, GoraConfigTypeError

Importance = Literal["mean_abs", "frobenius", "grad_nuclear"]
Features = Literal["identity", "sqrt"]
Estimator = Literal["full", "sketch"]
GammaSearch = Literal["golden", "scan"]

IMPORTANCE_NAMES = ("mean_abs", "frobenius", "grad_nuclear")
FEATURE_NAMES = ("identity", "sqrt")
ESTIMATOR_NAMES = ("full", "sketch")
GAMMA_SEARCH_NAMES = ("golden", "scan")


def check_int(name: str, value: Any, minimum: int) -> None:
    """An ``int`` (never a bool or a float such as 2.0) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GoraConfigTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise GoraConfigError(f"{name} must be >= {minimum}, got {value}.")


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
    gamma_search: GammaSearch = "golden"
    """How adaptive gamma searches: ``golden`` brackets the held-out loss from ``gamma`` and narrows the bracket by
    golden-section search in log gamma (about ten loss evaluations), within the grid's smallest positive and largest
    value; ``scan`` scores every candidate of ``gamma_grid`` (the reference to check against)."""
    gamma_grid: list[float] | None = None
    """Candidates for adaptive gamma; ``None`` means 1, 0.8, 0.64, ... down to 1e-5."""
    gamma_batches: int = 4
    """Held-out batches (taken after the first ``num_steps``) that score adaptive gamma."""
    head_warmup_steps: int = 0
    """Before estimation, train only the newly initialised modules PEFT keeps trainable (``modules_to_save``, with
    the classification head PEFT adds for task_type SEQ_CLS) for this many AdamW steps on the estimation batches,
    then estimate through the warmed head; ``apply_gora`` puts the warmed head into the returned model. 0: off."""
    head_warmup_lr: float = 1e-3
    """AdamW learning rate of the head warm-up."""
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
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ``GoraConfigError`` / ``GoraConfigTypeError`` with what to pass instead.

        Runs on construction and again when a config enters ``estimate_gora`` / ``get_gora_model``: the dataclass is
        mutable, so ``config.gamma = -1`` after construction is caught before any work.
        """
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
        self._check_choice("gamma_search", self.gamma_search, GAMMA_SEARCH_NAMES)
        if self.estimator == "sketch" and self.importance != "frobenius":
            raise GoraConfigError(
                f"estimator='sketch' keeps no full gradient, so importance={self.importance!r} cannot be computed; "
                "pass importance='frobenius' with the sketch estimator, or estimator='full'."
            )
        if self.offload is not None and not isinstance(self.offload, bool):
            raise GoraConfigTypeError(f"offload must be True, False or None (automatic), got {self.offload!r}.")
        for name in ("adaptive_steps", "adaptive_gamma", "train_mode", "gradient_checkpointing", "show_progress"):
            if not isinstance(getattr(self, name), bool):
                raise GoraConfigTypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        self._check_int("seed", self.seed, minimum=0)
        self._check_int("sketch_dim", self.sketch_dim, minimum=1)
        self._check_int("min_steps", self.min_steps, minimum=1)
        self._check_int("gamma_batches", self.gamma_batches, minimum=1)
        self._check_int("head_warmup_steps", self.head_warmup_steps, minimum=0)
        self._check_float("head_warmup_lr", self.head_warmup_lr, minimum=0.0)
        if self.head_warmup_lr == 0 and self.head_warmup_steps > 0:
            raise GoraConfigError("head_warmup_lr=0 would leave the head as it is; pass a learning rate > 0 "
                                  "(e.g. 1e-3), or head_warmup_steps=0 to switch the warm-up off.")
        self._check_float("convergence_threshold", self.convergence_threshold, minimum=0.0)
        self._check_float("fp16_loss_scale", self.fp16_loss_scale, minimum=1.0)
        if self.gamma_grid is not None:
            if isinstance(self.gamma_grid, (str, bytes)) or not isinstance(self.gamma_grid, (list, tuple)):
                raise GoraConfigTypeError(
                    f"gamma_grid must be a list of candidate gammas or None, got {self.gamma_grid!r}."
                )
            if len(self.gamma_grid) == 0:
                raise GoraConfigError("gamma_grid is empty; pass candidate gammas >= 0, or None for the default grid.")
            for value in self.gamma_grid:
                self._check_float("gamma_grid entry", value, minimum=0.0)
        self._check_extra(self.extra)

    # -- validation helpers -------------------------------------------------------------
    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        check_int(name, value, minimum)

    @staticmethod
    def _check_float(name: str, value: Any, minimum: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GoraConfigTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if not math.isfinite(value) or value < minimum:
            raise GoraConfigError(f"{name} must be a finite number >= {minimum}, got {value}.")

    @staticmethod
    def _check_extra(extra: Any) -> None:
        if not isinstance(extra, dict):
            raise GoraConfigTypeError(f"extra must be a dict of notes, got {type(extra).__name__}.")
        try:  # it is saved with the state: refuse now rather than fail at state.save
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as error:
            raise GoraConfigError(
                f"extra must hold JSON-serialisable notes (str, numbers, lists, dicts): {error}."
            ) from None

    @staticmethod
    def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise GoraConfigError(f"{name}={value!r} is not known; choose one of {', '.join(choices)}.")

    # -- derived values -----------------------------------------------------------------
    def rank_bounds(self, reference_rank: int) -> tuple[int, int]:
        """(min_rank, max_rank) with the defaults resolved against LoRA's reference rank r."""
        check_int("LoraConfig.r", reference_rank, minimum=1)
        min_rank = max(1, reference_rank // 2) if self.min_rank is None else self.min_rank
        max_rank = 4 * reference_rank if self.max_rank is None else self.max_rank
        if min_rank > max_rank:
            raise GoraConfigError(
                f"with r={reference_rank} the rank range is [{min_rank}, {max_rank}], which is empty; "
                "set min_rank and max_rank explicitly."
            )
        return min_rank, max_rank

    @property
    def least_steps(self) -> int:
        """Steps estimation needs at least: ``num_steps``, or for adaptive steps (where ``num_steps`` is the cap)
        ``min(min_steps, num_steps)``."""
        return min(self.min_steps, self.num_steps) if self.adaptive_steps else self.num_steps

    def resolved_gamma_grid(self) -> list[float]:
        return list(self.gamma_grid) if self.gamma_grid is not None else default_gamma_grid()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def paper(cls, **changes: Any) -> GoraConfig:
        """The paper's settings (GoRA, arXiv 2502.12171): N = 32 batches, γ = 5e-2 (a fixed step, no adaptive γ),
        importance mean|W⊙Ḡ|, the cost of a rank unit √(in+out) (``features="sqrt"``, the paper's text), ranks in
        [r/2, 4r] (``min_rank``/``max_rank`` None), the full gradient, no adaptive N, no head warm-up.

        ``changes`` override single fields (``GoraConfig.paper(seed=42)``). Whatever later becomes GoraConfig's
        default, this preset stays. Not a field: the allocation rounds as the library always does (the floor of the
        rounded share, as the official scripts; the paper's text says round).
        """
        settings = {"num_steps": 32, "min_rank": None, "max_rank": None, "gamma": 5e-2, "importance": "mean_abs",
                    "features": "sqrt", "estimator": "full", "adaptive_steps": False, "adaptive_gamma": False,
                    "head_warmup_steps": 0}
        refuse_unknown_fields(changes, GoraConfigTypeError)
        return cls(**{**settings, **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GoraConfig:
        if not isinstance(data, dict):
            raise GoraConfigTypeError(f"GoraConfig.from_dict needs a dict, got {type(data).__name__}.")
        refuse_unknown_fields(data, GoraConfigError)
        return cls(**data)


def refuse_unknown_fields(names: Any, error: type[GoraConfigError]) -> None:
    """Raise ``error`` naming every unknown GoraConfig field, with the closest known name where one is close."""
    known = [f.name for f in dataclasses.fields(GoraConfig)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        close = {name: match[0] for name in unknown if (match := difflib.get_close_matches(name, known, 1))}
        hint = "".join(f" {meant!r} for {name!r}," for name, meant in close.items())
        hint = f" Did you mean{hint.rstrip(',')}?" if close else ""
        raise error(f"unknown GoraConfig fields {unknown};{hint} known fields are {sorted(known)}.")


@functools.lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """Each GoraConfig field's docstring (the string literal under it in this file), whitespace collapsed.

    The one place the fields are explained: the ``gora init`` options take their help text from here.
    """
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(GoraConfig))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(name: str) -> Any:
    """The default of GoraConfig field ``name`` (a fresh copy for fields with a default factory)."""
    for spec in dataclasses.fields(GoraConfig):
        if spec.name == name:
            if spec.default is not dataclasses.MISSING:
                return spec.default
            return spec.default_factory()  # type: ignore[operator]  # MISSING unless a factory is set
    refuse_unknown_fields([name], GoraConfigTypeError)


def _checked_init(init: Any) -> Any:
    """The dataclass ``__init__``, refusing unknown keyword arguments as a GoraConfigTypeError (a TypeError, as
    Python's own refusal is) that suggests the field meant: ``GoraConfig(num_step=8)`` → ``num_steps``."""

    @functools.wraps(init)
    def __init__(self: GoraConfig, *args: Any, **kwargs: Any) -> None:
        refuse_unknown_fields(kwargs, GoraConfigTypeError)
        init(self, *args, **kwargs)

    return __init__


GoraConfig.__init__ = _checked_init(GoraConfig.__init__)  # type: ignore[method-assign]


def check_gora_config(gora_config: Any) -> GoraConfig:
    """``gora_config`` itself, re-validated, or ``GoraConfig()`` for ``None``; anything else is refused."""
    if gora_config is None:
        return GoraConfig()
    if not isinstance(gora_config, GoraConfig):
        raise GoraConfigTypeError(
            f"gora_config must be a GoraConfig or None, got {type(gora_config).__name__}; "
            "build one with GoraConfig(...) (or GoraConfig.from_dict(d) for a dict)."
        )
    gora_config.validate()  # fields may have been set after construction
    return gora_config


def check_lora_config(lora_config: Any) -> None:
    """Refuse a LoraConfig GoRA cannot use before any work: not a LoraConfig, r < 1, or α not a positive number.

    Raises:
        GoraConfigTypeError: not a ``peft.LoraConfig``, or ``r`` / ``lora_alpha`` of the wrong type.
        GoraConfigError: ``r < 1`` or ``lora_alpha`` not finite and > 0 (B = −(γ√in/α)·C divides by α).
    """
    from peft import LoraConfig  # imported here: `import gora` stays free of torch and peft

    if not isinstance(lora_config, LoraConfig):
        raise GoraConfigTypeError(
            f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}; "
            "build one with LoraConfig(r=8, lora_alpha=16, target_modules=[...])."
        )
    check_int("LoraConfig.r", lora_config.r, minimum=1)
    alpha = lora_config.lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise GoraConfigTypeError(f"LoraConfig.lora_alpha must be a number, got {alpha!r}.")
    if not math.isfinite(alpha) or alpha <= 0:
        raise GoraConfigError(
            f"LoraConfig.lora_alpha must be a finite number > 0, got {alpha}; GoRA scales B by 1/alpha "
            "(try lora_alpha = 2 * r)."
        )
