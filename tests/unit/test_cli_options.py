"""`gora init`'s GoRA options are GoraConfig's fields: same names, defaults, choices and help text."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from gora import cli
from gora.cli import config_options
from gora.config import GoraConfig, field_docs


def _init_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return verbs.choices["init"]


def test_every_gora_config_field_has_an_init_option_with_its_default_choices_and_docstring():
    actions = {a.dest: a for a in _init_parser()._actions}
    hints = typing.get_type_hints(GoraConfig)
    docs = field_docs()
    for spec in dataclasses.fields(GoraConfig):
        if spec.name in config_options.CLI_EXCLUDED_FIELDS:
            continue
        action = actions.get(spec.name)
        assert action is not None, f"GoraConfig.{spec.name} has no gora init option"
        assert action.option_strings == ["--" + spec.name.replace("_", "-")] or (
            action.option_strings[0] == "--" + spec.name.replace("_", "-"))
        assert action.default == getattr(GoraConfig(), spec.name), spec.name
        if typing.get_origin(hints[spec.name]) is typing.Literal:
            assert tuple(action.choices) == typing.get_args(hints[spec.name]), spec.name
        first_words = " ".join(docs[spec.name].replace("``", "").split()[:4])
        assert first_words in " ".join(action.help.split()), spec.name
    assert set(config_options.CLI_EXCLUDED_FIELDS) <= {f.name for f in dataclasses.fields(GoraConfig)}


def test_init_without_gora_options_gives_the_default_config_and_options_reach_it():
    parser = cli.build_parser()
    args = parser.parse_args(["init", "m", "d", "-o", "out"])
    built = GoraConfig(**{f.name: getattr(args, f.name) for f in config_options.gora_option_fields()})
    assert built == GoraConfig()
    args = parser.parse_args(["init", "m", "d", "-o", "out", "--gamma", "0.2", "--features", "sqrt", "--offload",
                              "--gamma-grid", "0.1", "0.01", "--head-warmup-steps", "3", "--adaptive-gamma"])
    built = GoraConfig(**{f.name: getattr(args, f.name) for f in config_options.gora_option_fields()})
    assert (built.gamma, built.features, built.offload, built.gamma_grid, built.head_warmup_steps,
            built.adaptive_gamma) == (0.2, "sqrt", True, [0.1, 0.01], 3, True)
    assert parser.parse_args(["init", "m", "d", "-o", "o", "--no-offload"]).offload is False


def test_field_docs_reads_every_field_docstring():
    docs = field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(GoraConfig)}
    assert docs["gamma_batches"].startswith("Held-out batches")
