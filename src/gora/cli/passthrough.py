"""``gora bench`` and ``gora demo``: handed over to ``gora.bench`` by its module name, which no library module
imports (the laboratory is an optional extra)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import GoraUnsupportedError

PASSTHROUGH = ("bench", "demo")  # verbs whose options belong to gora.bench


def run_passthrough(verb: str, argv: list[str]) -> int:
    """Hand ``argv`` (what followed ``gora VERB``) to ``gora.bench.cli.main``; its exit status."""
    try:
        bench_cli = importlib.import_module("gora.bench.cli")
    except ModuleNotFoundError as error:
        if error.name not in ("gora.bench.cli", "gora.bench"):
            raise GoraUnsupportedError(f"gora {verb} needs the benchmark extras ({error.name} is missing): "
                                       "pip install 'gora-peft[bench]'.") from error
        return _demo_fallback(verb, argv)
    main_fn = getattr(bench_cli, "main", None)
    if main_fn is None:
        raise GoraUnsupportedError(f"gora.bench.cli has no main(argv); this gora cannot run 'gora {verb}'.")
    result = main_fn([verb, *argv] if verb == "demo" else argv)
    return int(result or 0)


def _demo_fallback(verb: str, argv: list[str]) -> int:
    run_demo = getattr(_optional_module("gora.bench.demo"), "run_demo", None)
    if verb == "demo" and run_demo is not None and not argv:
        run_demo()
        return 0
    raise GoraUnsupportedError(
        f"'gora {verb}' is provided by gora.bench.cli, which this installation lacks. Install the full package "
        "(pip install 'gora-peft[bench]') or run the benchmark scripts under benchmarks/ directly.")


def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


__all__ = ["PASSTHROUGH", "run_passthrough"]
