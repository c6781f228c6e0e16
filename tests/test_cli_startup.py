"""`irlm --help` and `irlm --version` answer without importing torch (over a second of
start-up), and each command still gets its full parser when it is named."""
import subprocess
import sys

import pytest

from irlm.cli import SUMMARIES

PROBE = """
import contextlib, io, sys
from irlm.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main({argv!r})
    except SystemExit as e:
        code = e.code
print(repr((code, "torch" in sys.modules, out.getvalue())))
"""


def _probe(argv):
    r = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_top_level_help_and_version_do_not_import_torch(argv):
    code, imported_torch, text = _probe(argv)
    assert code == 0
    assert not imported_torch
    assert text.strip()


def test_top_level_help_lists_every_command_with_its_summary():
    _, _, text = _probe(["--help"])
    flat = " ".join(text.split())
    for name, summary in SUMMARIES.items():
        assert name in flat
        assert " ".join(summary.split()) in flat


def test_a_named_command_gets_its_full_parser_after_top_level_flags():
    code, imported_torch, text = _probe(["--debug", "compile", "--help"])
    assert code == 0
    assert "--max-batch" in text and "--quant" in text   # the flags of `irlm compile`
    assert imported_torch   # its flags list the passes, which need the op registry


def test_every_command_module_is_named_in_the_summaries():
    from pathlib import Path
    import irlm.cli
    modules = {p.stem.replace("_", "-") for p in Path(irlm.cli.__file__).parent.glob("*.py")
               if p.stem != "__init__"}
    assert modules == set(SUMMARIES)
