"""The gora exception family: one base class, each error also the builtin that describes it."""

import pytest

import gora
from gora import errors
from gora.errors import (
    GoraConfigError,
    GoraConfigTypeError,
    GoraDataError,
    GoraError,
    GoraNumericalError,
    GoraStateError,
    GoraTargetError,
    GoraTypeError,
    GoraUnsupportedError,
)

BUILTIN_OF = {
    GoraConfigError: ValueError,
    GoraTypeError: TypeError,
    GoraTargetError: ValueError,
    GoraUnsupportedError: TypeError,
    GoraDataError: ValueError,
    GoraNumericalError: RuntimeError,
    GoraStateError: ValueError,
}


@pytest.mark.parametrize("error, builtin", BUILTIN_OF.items(), ids=[e.__name__ for e in BUILTIN_OF])
def test_every_gora_error_is_a_gora_error_and_its_builtin(error, builtin):
    assert issubclass(error, GoraError) and issubclass(error, builtin)
    with pytest.raises(builtin, match="what to do"):
        raise error("what to do")


def test_config_type_error_is_caught_as_config_error_type_error_and_value_error():
    for base in (GoraConfigError, GoraTypeError, GoraError, TypeError, ValueError):
        assert issubclass(GoraConfigTypeError, base), base


def test_no_gora_error_derives_from_lookup_or_iteration_errors():
    # a caller catching KeyError/IndexError/StopIteration must never swallow a gora refusal by accident
    for name in errors.__all__:
        error = getattr(errors, name)
        assert not issubclass(error, (LookupError, StopIteration, KeyboardInterrupt)), name


def test_family_is_listed_in_errors_all_and_public_ones_importable_from_gora():
    classes = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
               and issubclass(getattr(errors, name), GoraError)}
    assert classes == set(errors.__all__)
    for name in ("GoraError", "GoraConfigError", "GoraDataError", "GoraNumericalError", "GoraStateError",
                 "GoraTargetError", "GoraUnsupportedError"):
        assert getattr(gora, name) is getattr(errors, name)
