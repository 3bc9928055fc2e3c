"""Package versions recorded in states, adapters and results."""

import platform

import torch

from gora.versions import package_versions


def test_versions_name_the_running_packages_and_each_call_gets_its_own_dict():
    versions = package_versions()
    assert versions["python"] == platform.python_version() and versions["torch"] == torch.__version__
    versions["torch"] = "changed by a caller"
    assert package_versions()["torch"] == torch.__version__  # the looked-up values are not shared
