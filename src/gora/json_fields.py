"""Checks of the values read from gora's JSON files (a saved state, an adapter's sidecar).

Each returns the value, or raises ``ValueError`` saying what was expected and what was found; ``read_fields`` adds
the key, and the reader of a file turns that into a ``GoraStateError`` naming the file and what to do. Strict:
``true`` is no integer, ``2.7`` is no rank, a float's infinity is no score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def integer(value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"expected an integer >= {minimum}, got {value!r}")
    return value


def number(value: Any, *, positive: bool = False) -> float:
    """A finite number (an integer beyond float's range, such as 1 followed by 400 zeros, is refused too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"expected a number within float's range, got an integer of {len(str(value))} digits") \
            from None
    if not math.isfinite(result) or (positive and result <= 0):
        raise ValueError(f"expected a finite number{' > 0' if positive else ''}, got {result!r}")
    return result


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {value!r}")
    return value


def mapping(read: Callable[[Any], T]) -> Callable[[Any], dict[str, T]]:
    """The check of an object whose every value passes ``read`` (keys of JSON objects are strings)."""
    def check(value: Any) -> dict[str, T]:
        return {key: read(item) for key, item in json_object(value).items()}

    return check


def is_shape(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


def shape(value: Any) -> tuple[int, int]:
    """An (out, in) pair of positive integers (a list in JSON)."""
    if not is_shape(value):
        raise ValueError(f"expected an (out, in) pair of positive integers, got {value!r}")
    return (value[0], value[1])


def read_fields(meta: dict[str, Any], checks: Mapping[str, Callable[[Any], Any]],
                required: Collection[str] = ()) -> dict[str, Any]:
    """``{key: checked value}`` for each key of ``checks`` that ``meta`` holds, in the order of ``checks``.

    Raises:
        ValueError: a ``required`` key is missing, or a value fails its check (the message names the key).
    """
    for key in required:
        if key not in meta:
            raise ValueError(f"{key!r} is missing")
    values = {}
    for key, read in checks.items():
        if key in meta:
            try:
                values[key] = read(meta[key])
            except (TypeError, ValueError, OverflowError) as error:
                raise ValueError(f"{key}: {error}") from None
    return values
