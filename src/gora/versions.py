"""Versions of the packages that produced a state or a result."""

from __future__ import annotations

import functools
import platform
from importlib import metadata


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
