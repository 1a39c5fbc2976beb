"""Package discovery for the one ``quantlab`` import namespace (everything else is in pyproject.toml).

engine/, evaluation/ and calib_data/ sit at the repository's top level (design card) but install as
``quantlab.engine``, ``quantlab.evaluation`` and ``quantlab.calib_data``. pyproject.toml's
``packages.find`` cannot add such a prefix, and a hand-written package list silently drops a new
subpackage from the wheel (editable installs hide it), so every directory under each root is found here.
Directories without ``__init__.py`` (evaluation/tasks, calib_data/heldout) are data directories and
ship as namespace packages, which is what keeps setuptools from warning that they are missing.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"quantlab": "quantlab", "quantlab.engine": "engine", "quantlab.evaluation": "evaluation",
         "quantlab.calib_data": "calib_data"}

packages = [name for name in ROOTS]
for name, where in ROOTS.items():
    packages += [f"{name}.{sub}" for sub in find_namespace_packages(where, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=ROOTS)
