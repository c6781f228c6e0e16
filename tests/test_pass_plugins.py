"""--pass-plugin files, and the example of docs/writing-a-pass.md (which must not drift)."""
import re
from pathlib import Path

import pytest

from irlm.text.parser import parse_graph
from irlm.passes import PluginError, get_pass, load_plugin, run_pipeline
from irlm.passes.registry import unregister_pass
from irlm.text.printer import print_graph

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-a-pass.md"
PLUGIN = ROOT / "tests" / "plugins" / "fold_identity_arith.py"


def doc_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker -->`` in the doc."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- " + re.escape(marker) + r" -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"docs/writing-a-pass.md has no block after <!-- {marker} -->"
    return m.group(1)


def test_the_doc_shows_the_plugin_file_exactly():
    assert doc_block("file: tests/plugins/fold_identity_arith.py") == \
        PLUGIN.read_text(encoding="utf-8")


def test_the_doc_example_runs_as_shown():
    load_plugin(PLUGIN)
    g = parse_graph(doc_block("example-input"), "example.irlm")
    run_pipeline(g, "fold-identity-arith,canonicalize")
    assert print_graph(g).rstrip("\n") == doc_block("example-output").rstrip("\n")


def test_plugin_options_and_doc():
    load_plugin(PLUGIN)
    info = get_pass("fold-identity-arith")
    assert info.options["merge_scales"].default is True
    assert info.summary.startswith("x * 1 = x")
    g = parse_graph(doc_block("example-input"))
    report = run_pipeline(g, "fold-identity-arith{merge_scales=false}")
    assert "merge_scales" not in report.stages[0].stats.patterns


def test_loading_twice_is_harmless():
    a = load_plugin(PLUGIN)
    assert load_plugin(PLUGIN) is a
    assert load_plugin(str(PLUGIN)) is a


def test_a_changed_plugin_file_reregisters_its_passes(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("from irlm.passes import register_pass\n"
                 "@register_pass('tmp-plugin-pass')\n"
                 "def p(graph):\n    'version one'\n")
    load_plugin(f)
    assert get_pass("tmp-plugin-pass").doc == "version one"
    f.write_text(f.read_text().replace("one", "two"))
    try:
        load_plugin(f)
        assert get_pass("tmp-plugin-pass").doc == "version two"
    finally:
        unregister_pass("tmp-plugin-pass")


@pytest.mark.parametrize("content, pattern", [
    (None, r"pass plugin .*missing\.py: no such file"),
    ("def broken(:\n", r"pass plugin .*bad\.py:1:\d+: syntax error"),
    ("x = 1\nraise ValueError('boom')\n", r"pass plugin .*bad\.py:2: ValueError: boom"),
    ("import no_such_module_xyz\n",
     r"pass plugin .*bad\.py:1: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("from irlm.passes import register_pass\nregister_pass('bad name')\n",
     r"pass plugin .*bad\.py:2: invalid pass name 'bad name'"),
])
def test_plugin_errors_are_one_line_naming_the_file(tmp_path, content, pattern):
    path = tmp_path / ("missing.py" if content is None else "bad.py")
    if content is not None:
        path.write_text(content)
    with pytest.raises(PluginError) as e:
        load_plugin(path)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_a_directory_is_not_a_plugin(tmp_path):
    with pytest.raises(PluginError, match="is a directory"):
        load_plugin(tmp_path)


def test_a_plugin_cannot_take_a_builtin_name(tmp_path):
    f = tmp_path / "clash.py"
    f.write_text("from irlm.passes import register_pass\n"
                 "@register_pass('dce')\n"
                 "def mine(graph):\n    'not the real dce'\n")
    with pytest.raises(PluginError, match=r"clash\.py:2: pass 'dce' is already registered "
                                          r"\(by .*dce\.py:\d+\)"):
        load_plugin(f)
