"""Rank maps: GoRA's ranks as a table (one row per module: shape, rank, importance or why it was left out), its
one-line spread, and as a grid of layers (rows) × module types (columns) drawn to a PNG.

In the grid, a module name splits at its first numeric component: ``bert.encoder.layer.3.attention.self.query``
is row ``bert.encoder.layer.3``, column ``attention.self.query``. Names without a layer index
(``pooler.dense``) go to a row of their own, ``(no layer index)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import GoraUnsupportedError

NO_INDEX = "(no layer index)"
_NUMBER = re.compile(r"^\d+$")


def rank_rows(ranks: Mapping[str, int], importance: Mapping[str, float], shapes: Mapping[str, Sequence[int]],
              skipped: Mapping[str, str]) -> list[str]:
    """The rank table's header and one row per module, sorted by name: shape, rank and importance; a module left
    out shows its reason in place of a score (``"no gradient"`` with rank 0, or ``-`` when it got no rank at all).
    A name without a shape or an importance gets a blank shape or ``nan``. The callers add their own footers."""
    rows = [f"{'module':<60} {'shape':>12} {'rank':>5} {'importance':>11}"]
    for name in sorted(ranks):
        shape = "x".join(str(v) for v in shapes[name]) if name in shapes else ""
        score = f"  skipped: {skipped[name]}" if name in skipped else f" {importance.get(name, math.nan):>11.4g}"
        rows.append(f"{name:<60} {shape:>12} {ranks[name]:>5}{score}")
    for name, reason in sorted(skipped.items()):
        if name not in ranks:
            rows.append(f"{name:<60} {'':>12} {'-':>5}  skipped: {reason}")
    return rows


def rank_spread(ranks: Iterable[int]) -> str:
    """``"ranks 4..32 over 210 layers"`` for the adapted (rank > 0) entries of ``ranks``, or ``"no adapted layer"``:
    the one phrasing of a rank table's footer, ``gora inspect``, the estimation log line and the demo."""
    adapted = [r for r in ranks if r > 0]
    if not adapted:
        return "no adapted layer"
    return f"ranks {min(adapted)}..{max(adapted)} over {len(adapted)} layer{'s' if len(adapted) > 1 else ''}"


@dataclass
class RankGrid:
    rows: list[str]
    """Layer labels, in model order (prefix, then layer index)."""
    columns: list[str]
    """Module types in order of first appearance, those of named layers first."""
    ranks: list[list[float]]
    """``ranks[i][j]``: rank of module ``columns[j]`` in layer ``rows[i]``; NaN where no such module exists."""


def split_name(name: str) -> tuple[str, int, str]:
    """(layer prefix, layer index, module type); index -1 and prefix ``NO_INDEX`` when there is none."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMBER.match(part) and i + 1 < len(parts):
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1:])
    return NO_INDEX, -1, name


def rank_grid(ranks: dict[str, int]) -> RankGrid:
    """Arrange ``{module name: rank}`` into a layer × module-type grid."""
    cells: dict[tuple[str, int], dict[str, int]] = {}
    kinds: dict[bool, list[str]] = {True: [], False: []}  # layer modules first, then those without an index
    for name in sorted(ranks, key=_model_order):
        prefix, index, kind = split_name(name)
        cells.setdefault((prefix, index), {})[kind] = ranks[name]
        if kind not in kinds[index >= 0]:
            kinds[index >= 0].append(kind)
    columns = kinds[True] + kinds[False]
    keys = sorted(cells, key=lambda k: (k[0] == NO_INDEX, k[0], k[1]))
    rows = [prefix if index < 0 else f"{prefix}.{index}" for prefix, index in keys]
    grid = [[float(cells[key].get(kind, math.nan)) for kind in columns] for key in keys]
    return RankGrid(rows, columns, grid)


def _model_order(name: str) -> tuple:
    """Sort key that orders numeric components numerically (layer 10 after layer 9)."""
    return tuple((0, int(p), "") if _NUMBER.match(p) else (1, 0, p) for p in name.split("."))


def plot_ranks(ranks: dict[str, int], path: str | Path, title: str = "GoRA ranks") -> Path:
    """Write a heatmap of the rank grid (numbers in the cells; blank where a layer has no such module).

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...); a path without one gets ``.png``. Returns
    the path written.

    Raises:
        GoraUnsupportedError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise GoraUnsupportedError("plotting ranks needs matplotlib: pip install matplotlib "
                                   "(or skip the plot, e.g. gora inspect --no-plot).") from error
    grid = rank_grid(ranks)
    rows, common = _short_rows(grid.rows)
    figure = Figure(figsize=(2.5 + 1.1 * len(grid.columns), max(3.0, 1.4 + 0.3 * len(rows))), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid.ranks, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(grid.columns)), grid.columns, rotation=35, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    axes.set_xlabel("module type")
    axes.set_ylabel(f"layer ({common}.N)" if common else "layer", fontsize=8)
    values = [v for row in grid.ranks for v in row if not math.isnan(v)]
    middle = (min(values) + max(values)) / 2 if values else 0.0
    for i, row in enumerate(grid.ranks):
        for j, value in enumerate(row):
            if not math.isnan(value):  # dark text on the bright end of viridis
                axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                          color="black" if value > middle else "white")
    figure.colorbar(image, ax=axes, label="rank")
    axes.set_title(title, fontsize=10)
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")  # as matplotlib would: say the name it really writes
    figure.savefig(path, dpi=110)
    return path


def _short_rows(rows: list[str]) -> tuple[list[str], str]:
    """Drop a prefix shared by every indexed row (``bert.encoder.layer.``) for readable labels."""
    indexed = [r for r in rows if r != NO_INDEX]
    prefixes = {r.rsplit(".", 1)[0] for r in indexed}
    if len(prefixes) != 1:
        return rows, ""
    common = prefixes.pop()
    return [r if r == NO_INDEX else r.rsplit(".", 1)[1] for r in rows], common


__all__ = ["rank_rows", "RankGrid", "split_name", "rank_grid", "plot_ranks"]
