"""GoraConfig's fields as ``gora init`` options, one per field (type, default, choices and help read from the
dataclass, so a new field or a changed default reaches the command without an edit here), and the GoraConfig built
back from the parsed options."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import GoraConfig

CLI_EXCLUDED_FIELDS = {"extra": "gora init writes its own notes there (model, data, LoRA settings)",
                       "show_progress": "given as --no-progress, shared with gora export"}
"""GoraConfig fields with no ``gora init`` option of their own, and why."""
CLI_FIELD_NOTES = {"seed": "gora init also seeds the batch shuffle and a new head with it."}
"""What the CLI adds to a field's docstring (never a default or a choice list: those come from GoraConfig)."""


def gora_option_fields() -> list[dataclasses.Field]:
    """The GoraConfig fields that ``gora init`` offers as options, in the dataclass's order."""
    from ..config import GoraConfig

    return [f for f in dataclasses.fields(GoraConfig) if f.name not in CLI_EXCLUDED_FIELDS]


def add_gora_options(group: argparse._ArgumentGroup) -> None:
    """One option per field of :func:`gora_option_fields`, ``--num-steps`` for ``num_steps``, into ``group``."""
    from ..config import GoraConfig, field_default, field_docs

    hints, docs = typing.get_type_hints(GoraConfig), field_docs()
    for spec in gora_option_fields():
        name, default = spec.name, field_default(spec.name)
        kind = hints[name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        text = " ".join(filter(None, (docs[name].replace("``", ""), CLI_FIELD_NOTES.get(name))))
        options: dict[str, Any] = {"default": default, "dest": name}
        if kind is bool and default is False:
            options["action"] = "store_true"
        elif kind is bool or (args == [bool]):
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif args and typing.get_origin(args[0]) is list:
            options.update(nargs="+", type=typing.get_args(args[0])[0], metavar="VALUE")
        else:
            options["type"] = args[0] if args else kind
        if not (kind is bool and default is False):
            text += f" (default: {default})"
        group.add_argument("--" + name.replace("_", "-"), help=text.replace("%", "%%"), **options)


def gora_config_from(args: argparse.Namespace) -> GoraConfig:
    """The GoraConfig the parsed options of ``gora init`` give (validated by GoraConfig itself)."""
    from ..config import GoraConfig

    return GoraConfig(**{f.name: getattr(args, f.name) for f in gora_option_fields()},
                      show_progress=not args.no_progress)


__all__ = ["CLI_EXCLUDED_FIELDS", "CLI_FIELD_NOTES", "gora_option_fields", "add_gora_options", "gora_config_from"]
