"""The ``gora`` command: ``init`` (estimate and save a state), ``inspect``, ``export``, ``bench``, ``demo``.

Only the standard library is imported at the top of this package's modules; torch, transformers, peft and matplotlib
load inside the verbs, so ``gora --help`` answers at once. Errors of the gora family print their message and exit
with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from ..errors import GoraError
from . import export, init, inspect
from .parser import build_parser
from .passthrough import PASSTHROUGH, run_passthrough

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {"init": init.run, "inspect": inspect.run,
                                                         "export": export.run}
"""The verbs gora parses itself, each to the function that runs it (``bench`` and ``demo`` are handed over)."""


def main(argv: list[str] | None = None) -> int:
    """Run ``gora ARGV`` (default: the command line's arguments); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rest = argv[1:] if verbose else argv
    try:
        if rest and rest[0] in PASSTHROUGH:
            return run_passthrough(rest[0], rest[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 2
        with _progress_bars(not getattr(args, "no_progress", False)):
            return VERBS[args.verb](args)
    except GoraError as error:
        print(f"gora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gora: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` false, transformers' and huggingface_hub's bars (loading, saving) are off for the verb, and
    tqdm starts no monitor thread (it would for the disabled bars that PEFT's merge still creates)."""
    if enabled:
        yield
        return
    import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled, interval = hf_logging.is_progress_bar_enabled(), tqdm.tqdm.monitor_interval
    hf_logging.disable_progress_bar()
    tqdm.tqdm.monitor_interval = 0
    try:
        yield
    finally:
        tqdm.tqdm.monitor_interval = interval
        if was_enabled:
            hf_logging.enable_progress_bar()


__all__ = ["main", "build_parser", "VERBS"]
