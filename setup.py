"""Package discovery for irlm's layout.

The repo's top-level folders (frontends/, passes/, lowering/, kernels/) are sub-packages of
``irlm`` (``package_dir`` below), so the tree shows the architecture while users import one
namespace.  Packages are discovered under each folder rather than listed by hand, so a new
sub-package cannot be left out of the wheel.  ``kernels/`` itself has no ``__init__.py`` on purpose (the package is ``kernels/src/``):
see docs/contributing.md ("Import names").
"""
from setuptools import find_packages, setup

PACKAGE_DIR = {
    "irlm": "irlm",
    "irlm.frontends": "frontends",
    "irlm.passes": "passes",
    "irlm.lowering": "lowering",
    "irlm.kernels": "kernels/src",
}


def discover() -> list[str]:
    found = []
    for package, folder in PACKAGE_DIR.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return found


setup(package_dir=PACKAGE_DIR, packages=discover())
