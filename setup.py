"""Package discovery that pyproject.toml cannot express on its own: tidecli's packages plus the
repository's profiles/ folder, installed as `tidecli.profiles` (mapped in pyproject.toml)."""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["tidecli*"]), "tidecli.profiles"])
