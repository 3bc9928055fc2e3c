"""Package versions recorded in states, adapters and results."""

import platform
import tomllib
from pathlib import Path

import torch

import gora
import gora.versions
from gora.versions import package_versions


def test_versions_name_the_running_packages_and_each_call_gets_its_own_dict():
    versions = package_versions()
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    versions["torch"] = "changed by a caller"
    assert package_versions()["torch"] == torch.__version__  # the looked-up values are not shared


def test_the_package_version_has_one_home_that_gora_and_the_package_metadata_read():
    assert gora.__version__ is gora.versions.__version__
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gora.versions.__version__"}
