"""Versions: gora-peft's own, those of the packages that produced a state or a result, and what to say about a file
of another format version."""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
"""gora-peft's version: ``gora.__version__`` and the package metadata (pyproject.toml) read it from here."""


def package_versions() -> dict[str, str]:
    """{package: version} of Python and the packages GoRA runs on (looked up once per process: ~14 ms each time)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("gora-peft", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def format_version_refusal(path: Path, version: Any, versions: Any, supported: int, redo: str) -> str:
    """What to do about the file ``path`` of format version ``version`` when this gora-peft reads ``supported``: the
    gora-peft that wrote it (from the file's ``versions``), or ``redo`` with this version."""
    writer = versions.get("gora-peft") if isinstance(versions, dict) else None
    writer = writer if isinstance(writer, str) and writer not in ("", "not installed") else None
    newer = isinstance(version, int) and not isinstance(version, bool) and version > supported
    if newer:
        reader = f"gora-peft {writer}" if writer else "the newer gora-peft that wrote it"
        upgrade = f"pip install 'gora-peft>={writer}'" if writer else "pip install --upgrade gora-peft"
        return (f"{path} has format version {version}, written by {reader}; this gora-peft {__version__} reads "
                f"format version {supported}. Read it with {reader} ({upgrade}), or {redo} with this version.")
    return (f"{path} has format version {version!r}; this gora-peft {__version__} reads format version "
            f"{supported}. {redo[0].upper()}{redo[1:]} with this version"
            f"{f' (or read it with gora-peft {writer}, which wrote it)' if writer else ''}.")
