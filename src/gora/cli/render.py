"""The rank table ``gora inspect`` prints: one row per layer, then the budget, the estimation and serving lines."""

from __future__ import annotations

from typing import Any


def rank_table(info: dict[str, Any]) -> str:
    """The table of ``info`` (a state's or a sidecar's ranks, importances, shapes and budget; all but the ranks
    optional)."""
    importance, shapes = info.get("importance", {}), info.get("shapes", {})
    rows = [f"{'module':<60} {'shape':>12} {'rank':>5} {'importance':>11}"]
    for name in sorted(info["ranks"]):
        shape = "x".join(str(v) for v in shapes[name]) if name in shapes else ""
        rows.append(f"{name:<60} {shape:>12} {info['ranks'][name]:>5} {importance.get(name, float('nan')):>11.4g}")
    for name, reason in sorted(info.get("skipped", {}).items()):
        if name not in info["ranks"] or reason != "no gradient":
            rows.append(f"{name:<60} {'':>12} {'-':>5}  skipped: {reason}")
    adapted = [r for r in info["ranks"].values() if r > 0]
    spread = f"ranks {min(adapted)}..{max(adapted)} over {len(adapted)} layers" if adapted else "no adapted layer"
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
