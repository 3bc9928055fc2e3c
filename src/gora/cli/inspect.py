"""``gora inspect``: the ranks of a GoraState or of an exported adapter's sidecar, as a table or JSON, and a plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..atomic import META_FILE, RANK_PLOT_FILE, SIDECAR_FILE
from ..errors import GoraStateError, GoraUnsupportedError
from .render import rank_table


def run(args: argparse.Namespace) -> int:
    """Print the rank table (or JSON) of ``args.path`` and, unless ``--no-plot``, write the rank plot."""
    path = Path(args.path)
    info = read_rank_info(path)
    if args.json:
        from ..serving import vllm_max_lora_rank

        adapted = [r for r in info["ranks"].values() if r > 0]
        info["vllm_max_lora_rank"] = vllm_max_lora_rank(max(adapted)) if adapted else None
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(rank_table(info))
    if not args.no_plot:
        from ..plotting import plot_ranks

        target = Path(args.plot) if args.plot else path / RANK_PLOT_FILE
        try:
            target = plot_ranks({n: r for n, r in info["ranks"].items() if r > 0}, target,
                                title=f"GoRA ranks: {path.name}")
        except GoraUnsupportedError as error:  # no matplotlib: the default plot is skipped, an asked-for one fails
            if args.plot:
                raise
            print(f"rank plot skipped: {error}", file=sys.stderr)
            return 0
        except OSError as error:
            raise GoraStateError(f"cannot write the rank plot to {target} ({error.strerror or error}); pass "
                                 "--plot PATH in a directory you can write to, or --no-plot.") from error
        print(f"wrote rank plot to {target}", file=sys.stderr if args.json else sys.stdout)
    return 0


def read_rank_info(path: Path) -> dict[str, Any]:
    """Ranks, importances and budget from a state directory or an adapter's ``gora_config.json``."""
    if (path / META_FILE).is_file():
        from ..export import rank_info
        from ..state import GoraState

        state = GoraState.load(path)
        return {"kind": "state", **rank_info(state), "shapes": {n: list(s) for n, s in state.shapes.items()},
                "estimation_seconds": state.estimation_seconds, "init_stats": state.init_stats}
    if not (path / SIDECAR_FILE).is_file():
        raise GoraStateError(f"{path} holds neither {META_FILE} (gora init) nor {SIDECAR_FILE} (an adapter "
                             "written by gora export / gora.export_adapter); nothing to inspect.")
    from ..export import read_sidecar

    return {"kind": "adapter", **read_sidecar(path)}


__all__ = ["run", "read_rank_info"]
