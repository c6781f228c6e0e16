"""IR-in / IR-out tests: every ``tests/filecheck/**/*.irlm`` file is one test.

A file's first RUN line says what to run, with ``%s`` standing for the file:

    # RUN: irlm opt %s --pipeline "canonicalize" | filecheck %s
    # RUN: irlm ir print %s | filecheck %s
    # RUN-ERROR: irlm ir check %s 2>&1 | filecheck %s

The part before the first ``|`` runs in the repository root; ``RUN`` needs it to exit 0,
``RUN-ERROR`` needs it to fail (so error messages are FileCheck-tested too).  Its standard
output is then piped to the part after the ``|`` (FileCheck, reading the ``# CHECK:`` lines of
the same file), which must exit 0.  The two parts run separately, as with ``set -o pipefail``:
a failing irlm cannot pass a test whose checks happen to match.

``irlm ARGS [2>&1]`` runs this checkout's CLI (``irlm.cli.main``) in this process, so torch is
imported once for all files, not once per file; an exception escaping the CLI is a crash and
fails the test even under RUN-ERROR.  Anything else runs in a shell (``shell=True``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILECHECK_DIR = Path(__file__).resolve().parent / "filecheck"
FILES = sorted(FILECHECK_DIR.rglob("*.irlm"))
RUN_RE = re.compile(r"^\s*#\s*(RUN|RUN-ERROR):\s*(.*\S)\s*$")


def _run_line(path: Path) -> tuple[str, str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = RUN_RE.match(line)
        if m:
            return m.group(1), m.group(2)
    raise AssertionError(f"{path}: no '# RUN:' or '# RUN-ERROR:' line")


def _split_pipe(command: str) -> tuple[str, str | None]:
    """Split at the first ``|`` outside quotes (``||`` is not a pipe)."""
    quote = None
    i = 0
    while i < len(command):
        c = command[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif c == "|":
            if command[i + 1:i + 2] == "|":
                i += 2
                continue
            return command[:i].strip(), command[i + 1:].strip()
        i += 1
    return command.strip(), None


def _irlm_in_process(command: str):
    """Run ``irlm ARGS [2>&1]`` with irlm.cli.main in this process → (rc, stdout, stderr), or
    None if the command needs a shell (redirections, variables, several commands)."""
    merge = command.endswith("2>&1")
    args = command[:-len("2>&1")] if merge else command
    if "$" in args or "`" in args:
        return None
    lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        argv = list(lexer)
    except ValueError:
        return None
    if not argv or argv[0] != "irlm" or any(set(a) <= set("();<>|&") for a in argv):
        return None
    from irlm.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out if merge else err):
        try:
            rc = main(argv[1:])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return rc or 0, out.getvalue(), err.getvalue()


def _run(command: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run one side of the pipe from the repository root → (rc, stdout, stderr)."""
    if stdin is None:
        done = _irlm_in_process(command)
        if done is not None:
            return done
    if command.startswith("irlm"):  # the checkout's CLI, whatever PATH says
        command = f"{shlex.quote(sys.executable)} -m irlm" + command[len("irlm"):]
    elif command.startswith("filecheck"):
        command = shlex.quote(shutil.which("filecheck") or "filecheck") + command[9:]
    p = subprocess.run(command, shell=True, cwd=ROOT, input=stdin, capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.skipif(importlib.util.find_spec("irlm.cli") is None,
                    reason="the irlm CLI (irlm/cli/__init__.py) is not in this checkout")
@pytest.mark.skipif(shutil.which("filecheck") is None,
                    reason="FileCheck is not installed (pip install filecheck)")
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(FILECHECK_DIR)) for p in FILES])
def test_filecheck(path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)  # RUN lines name plugins and inputs relative to the repository root
    kind, command = _run_line(path)
    command = command.replace("%s", shlex.quote(str(path)))
    producer, checker = _split_pipe(command)
    rc, out, err = _run(producer)
    shown = f"$ {producer}\n--- exit status {rc}; stdout ---\n{out}--- stderr ---\n{err}"
    if kind == "RUN":
        assert rc == 0, f"the command failed:\n{shown}"
    else:
        assert rc != 0, f"RUN-ERROR: the command succeeded:\n{shown}"
    if checker is None:
        return
    rc2, out2, err2 = _run(checker, stdin=out)
    assert rc2 == 0, f"{shown}\n$ {checker}\n--- exit status {rc2} ---\n{out2}{err2}"


def test_split_pipe():
    assert _split_pipe('irlm opt %s --pipeline "a|b" | filecheck %s') == \
        ('irlm opt %s --pipeline "a|b"', "filecheck %s")
    assert _split_pipe("irlm ir check %s 2>&1 | filecheck %s") == \
        ("irlm ir check %s 2>&1", "filecheck %s")
    assert _split_pipe("a || b") == ("a || b", None)
