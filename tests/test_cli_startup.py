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


def test_a_warning_prints_as_one_line_and_in_full_with_debug(monkeypatch, capsys, tmp_path):
    import warnings

    import irlm.cli.ir as ir_cli
    from irlm.cli import main

    def check(args):
        warnings.warn("the engine computes in f32 (a test)", RuntimeWarning)
        return 0
    monkeypatch.setattr(ir_cli, "check", check)
    assert main(["ir", "check", str(tmp_path / "x.irlm")]) == 0
    err = capsys.readouterr().err
    assert err == "irlm: warning: the engine computes in f32 (a test)\n"
    # --debug leaves the warning to Python's machinery (here pytest's, which records it)
    with pytest.warns(RuntimeWarning, match=r"the engine computes in f32 \(a test\)"):
        assert main(["ir", "check", str(tmp_path / "x.irlm"), "--debug"]) == 0
    assert "irlm: warning" not in capsys.readouterr().err
