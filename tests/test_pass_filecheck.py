"""Runs the `# RUN:` line of every tests/filecheck/passes/*.irlm file.

``irlm`` stages of a RUN pipeline run in this process (importing torch once, not once per
file); other stages (``filecheck``) run as subprocesses.  The shared collector
tests/test_filecheck.py runs every tests/filecheck/**/*.irlm; where it exists this module
skips itself so no file is run twice.
"""
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from irlm.cli import main as irlm_main

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "tests" / "filecheck" / "passes").glob("*.irlm"))

pytestmark = pytest.mark.skipif((ROOT / "tests" / "test_filecheck.py").exists(),
                                reason="tests/test_filecheck.py runs these files")


def run_command(path: Path) -> tuple[bool, list[list[str]]]:
    """(expect failure, the RUN line's stages as argv lists with %s substituted).

    ``# RUN-ERROR:`` expects the first stage to fail; ``2>&1`` merges its stderr."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"#\s*(RUN|RUN-ERROR):\s*(.*)", first)
    assert m, f"{path.name}: the first line must be '# RUN: ...' or '# RUN-ERROR: ...'"
    stages = [shlex.split(s) for s in m.group(2).split("|")]
    return m.group(1) == "RUN-ERROR", [[str(path) if a == "%s" else a for a in argv]
                                       for argv in stages]


def run_irlm(argv: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = irlm_main(argv)
            except SystemExit as e:  # argparse
                rc = e.code
    finally:
        sys.stdin = saved
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_filecheck(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # RUN lines name files relative to the repository root
    expect_error, stages = run_command(path)
    data = ""
    for i, argv in enumerate(stages):
        merge = "2>&1" in argv
        argv = [a for a in argv if a != "2>&1"]
        if argv[0] == "irlm":
            rc, data, err = run_irlm(argv[1:], data)
        else:
            proc = subprocess.run(argv, input=data, cwd=ROOT, capture_output=True, text=True)
            rc, data, err = proc.returncode, proc.stdout, proc.stderr
        if merge:
            data, err = data + err, ""
        if i == 0 and expect_error:
            assert rc != 0, f"RUN-ERROR: {' '.join(argv)} succeeded:\n{data}"
        else:
            assert rc == 0, f"{' '.join(argv)} failed (exit {rc}):\n{data}{err}"
