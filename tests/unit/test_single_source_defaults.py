"""GoRA's defaults are stated once, in GoraConfig: other modules read them from there."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import gora
from gora import GoraConfig
from gora.bench.builders import GAMMA_BATCHES, MethodConfig
from gora.gamma_search import search_gamma
from gora.state import GoraState

SOURCE = Path(gora.__file__).parent


def test_no_module_but_config_writes_gamma_default_as_a_literal():
    gamma = GoraConfig().gamma
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "config.py" and path.parent == SOURCE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and type(node.value) is float and node.value == gamma:
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert not found, f"gamma's default written outside GoraConfig: {found}"


def test_defaults_elsewhere_follow_gora_config():
    config = GoraConfig()
    assert GoraState.__dataclass_fields__["gamma"].default == config.gamma
    assert inspect.signature(search_gamma).parameters["start"].default == config.gamma
    method = MethodConfig()
    assert (method.gora_gamma, method.init_steps, method.gora_importance, method.gora_estimator) == (
        config.gamma, config.num_steps, config.importance, config.estimator)
    assert GAMMA_BATCHES == config.gamma_batches


def test_bench_cli_defaults_and_choices_follow_gora_config():
    from gora.bench.cli import build_parser
    from gora.config import ESTIMATOR_NAMES, IMPORTANCE_NAMES

    grid = build_parser()
    actions = {}
    for action in grid._actions:
        for choice in getattr(action, "choices", None) or {}:
            if hasattr(action.choices[choice], "_actions"):
                actions.update({a.dest: a for a in action.choices[choice]._actions})
    actions.update({a.dest: a for a in grid._actions})
    config = GoraConfig()
    assert actions["gamma"].default == config.gamma
    assert actions["gora_steps"].default == config.num_steps
    assert tuple(actions["gora_importance"].choices) == IMPORTANCE_NAMES
    assert tuple(actions["gora_estimator"].choices) == ESTIMATOR_NAMES
