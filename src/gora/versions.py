"""Versions of the packages that produced a state or a result."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("gora-peft", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
