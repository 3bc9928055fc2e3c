"""gora.bench: the benchmark harness (methods x tasks x seeds on MiniLM) behind the project's evidence.

Entry points: :func:`gora.bench.grid.run_grid`, :func:`gora.bench.demo.run_demo`,
:func:`gora.bench.report.write_report`, :func:`gora.bench.assets.export_assets`, and
``python -m gora.bench {grid,rank-sweep,demo,report,export-assets}``. Importing this package is cheap (no torch);
it sets ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` unless already set, since every asset ships offline.
"""

from __future__ import annotations

import os


def set_offline_env() -> None:
    """Keep the Hugging Face libraries off the network (no-op for variables the user has set)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


set_offline_env()
