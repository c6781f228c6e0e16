"""Nothing in the repo shadows another distribution's import name.

Python puts the working directory (``python3 -c``, ``python3 -m pytest``, a notebook) or the
script's folder (``python3 benchmarks/x.py``) first on ``sys.path``, and pytest puts ``tests/``
there.  A folder with an ``__init__.py`` or a ``.py`` file in one of those places that has the
name of an installed distribution's top-level package wins over site-packages: transformers
imports HF's ``kernels`` and would get irlm's folder.  See docs/contributing.md.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PATH_FOLDERS = [REPO, REPO / "benchmarks", REPO / "tests", REPO / "scripts"]


def importable_names(folder: Path) -> dict[str, Path]:
    """What ``import NAME`` would find in ``folder`` ahead of site-packages."""
    names = {}
    for p in folder.iterdir():
        if p.suffix == ".py" and p.stem != "__init__":
            names[p.stem] = p
        elif p.is_dir() and (p / "__init__.py").exists():
            names[p.name] = p
    return names


@pytest.mark.parametrize("folder", PATH_FOLDERS, ids=lambda p: p.name or "root")
def test_no_module_in_a_path_folder_takes_a_distributions_name(folder):
    installed = importlib.metadata.packages_distributions()
    clashes = {name: (str(path.relative_to(REPO)), installed[name])
               for name, path in importable_names(folder).items()
               if name in installed and name != "irlm"}
    assert not clashes, f"these shadow installed distributions' packages: {clashes}"


def test_kernels_is_not_importable_as_a_top_level_package_of_the_repo():
    # kernels/ is the design's folder name and HF's distribution name: it must stay a plain
    # folder (the package is kernels/src/, mapped to irlm.kernels)
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "src" / "__init__.py").exists()


@pytest.mark.parametrize("cwd", [REPO, REPO / "benchmarks"], ids=["root", "benchmarks"])
def test_transformers_and_hf_kernels_resolve_to_site_packages(cwd):
    pytest.importorskip("kernels")          # HF's; transformers >= 5 depends on it
    code = ("import transformers.integrations.hub_kernels, kernels, irlm.kernels.ops; "
            "print(kernels.__file__); print(irlm.kernels.ops.__file__)")
    # exactly how README's test command and a user's `python3 -c` start: cwd first on sys.path
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hf, ours = (Path(line).resolve() for line in out.stdout.split())
    assert not hf.is_relative_to(REPO), hf
    assert "site-packages" in hf.parts or "dist-packages" in hf.parts, hf
    assert ours == REPO / "kernels" / "src" / "ops.py" or "site-packages" in ours.parts


def test_import_irlm_is_lazy_about_the_runtime():
    """`import irlm` (the IR core pass writers use) loads neither the runtime nor transformers;
    `from irlm import LLM, SamplingParams` gives the runtime's classes."""
    code = ("import sys, irlm; assert 'transformers' not in sys.modules; "
            "assert 'irlm.runtime' not in sys.modules; "
            "from irlm import LLM, SamplingParams; import irlm.runtime as r; "
            "assert LLM is r.LLM and SamplingParams is r.SamplingParams; "
            "assert 'transformers' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
