"""The rank table ``gora inspect`` prints: :func:`gora.plotting.rank_rows`, then the budget, the estimation and
serving lines."""

from __future__ import annotations

from typing import Any

from ..plotting import rank_rows, rank_spread


def rank_table(info: dict[str, Any]) -> str:
    """The table of ``info`` (a state's or a sidecar's ranks, importances, shapes and budget; all but the ranks
    optional)."""
    rows = rank_rows(info["ranks"], info.get("importance", {}), info.get("shapes", {}), info.get("skipped", {}))
    adapted = [r for r in info["ranks"].values() if r > 0]
    spread = rank_spread(adapted)
    if "budget" in info:
        actual = info.get("actual_params", 0)
        rows.append(f"budget {info['budget']:,} params (LoRA r={info.get('r')}), actual {actual:,} "
                    f"({actual / max(info['budget'], 1):.1%}); {spread}")
    else:
        rows.append(spread)
    if "num_steps" in info:
        rows.append(f"{info['num_steps']} estimation steps, {info.get('num_samples', 0)} samples, "
                    f"gamma={info.get('gamma', float('nan')):g}")
    if info.get("init_stats"):
        from ..diagnostics import describe

        rows.append(describe(info["init_stats"]))
    if adapted:
        from ..serving import serving_hint

        rows.append(serving_hint(max(adapted)))
    return "\n".join(rows)


__all__ = ["rank_table"]
