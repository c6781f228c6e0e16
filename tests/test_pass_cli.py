"""`irlm opt`: flags, output, and errors as one line with a non-zero exit (no tracebacks)."""
import contextlib
import io
from pathlib import Path

import pytest

from irlm.cli import main
from irlm.passes.registry import unregister_pass

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"

TEXT = """dim seq = [1, 16]

graph @g(%x: tensor<[seq]x8xf32>) -> (tensor<[seq]x8xf32>) {
  %r0 = core.reshape(%x) {shape = [seq, 2, 4]} : tensor<[seq]x2x4xf32>
  %r1 = core.reshape(%r0) {shape = [seq, 8]} : tensor<[seq]x8xf32>
  %e = core.exp(%r1) : tensor<[seq]x8xf32>
  %d = core.sub(%e, %x) : tensor<[seq]x8xf32>
  %unused = core.neg(%d) : tensor<[seq]x8xf32>
  return %d
}
"""


@pytest.fixture
def ir_file(tmp_path):
    p = tmp_path / "g.irlm"
    p.write_text(TEXT)
    return p


def irlm(*args, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    import sys
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code
    finally:
        sys.stdin = saved
    return rc, out.getvalue(), err.getvalue()


def test_opt_runs_a_pipeline(ir_file):
    rc, out, err = irlm("opt", ir_file, "--pipeline", "canonicalize,dce")
    assert rc == 0, err
    assert "core.reshape" not in out and "core.neg" not in out and "core.exp(%x)" in out


def test_opt_levels(ir_file):
    rc, o0, _ = irlm("opt", ir_file, "-O0")
    assert rc == 0 and "core.reshape" in o0
    rc, o1, _ = irlm("opt", ir_file, "-O1")
    assert rc == 0 and "core.reshape" not in o1
    rc, o2, _ = irlm("opt", ir_file, "-O2")
    assert rc == 0


def test_opt_writes_the_output_file_and_reads_stdin(ir_file, tmp_path):
    out_path = tmp_path / "out.irlm"
    rc, out, err = irlm("opt", ir_file, "-O1", "-o", out_path)
    assert rc == 0 and out == "" and "core.exp(%x)" in out_path.read_text()
    rc, out, err = irlm("opt", "-", "-O1", stdin=TEXT)
    assert rc == 0 and out == out_path.read_text()


def test_list_passes():
    rc, out, _ = irlm("opt", "--list-passes", "--pass-plugin", PLUGINS / "fold_identity_arith.py")
    assert rc == 0
    assert "canonicalize" in out and "fold_limit: int = 1024" in out
    assert "fold-identity-arith" in out and "merge_scales: bool = true" in out
    assert "-O1: canonicalize,cse,dce" in out


def test_instrumentation_flags(ir_file, tmp_path):
    dump = tmp_path / "dump"
    rc, out, err = irlm("opt", ir_file, "-O1", "--print-ir-after=canonicalize",
                        "--print-ir-before", "dce", "--dump-ir-dir", dump, "--timing", "--stats")
    assert rc == 0, err
    assert "# ----- IR after canonicalize (stage 1) -----" in err
    assert "# ----- IR before dce (stage 3) -----" in err
    assert "pass timing" in err and "pass statistics" in err
    assert sorted(p.name for p in dump.iterdir()) == [
        "00-input.irlm", "01-canonicalize.irlm", "02-cse.irlm", "03-dce.irlm", "pipeline.txt"]
    # every dump replays: feeding stage 01 to cse,dce gives the final output
    rc, replay, _ = irlm("opt", dump / "01-canonicalize.irlm", "--pipeline", "cse,dce")
    assert replay == out


def test_check_numerics_names_the_broken_pass(ir_file):
    rc, out, err = irlm("opt", ir_file, "--pass-plugin", PLUGINS / "swap_sub_operands.py",
                        "--pipeline", "canonicalize,swap-sub-operands", "--check-numerics")
    assert rc == 1 and out == ""
    assert "pass 'swap-sub-operands' (stage 2) changed the graph's outputs" in err
    assert "core.sub (%d)" in err
    assert "Traceback" not in err


def test_check_numerics_passes_correct_pipelines(ir_file):
    rc, out, err = irlm("opt", ir_file, "-O1", "--check-numerics", "--numerics-rtol", "0",
                        "--numerics-atol", "0", "--numerics-seed", "3")
    assert rc == 0, err


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "canonicalise"],
     "irlm: error: pipeline 'canonicalise', column 1: unknown pass 'canonicalise'; did you "
     "mean 'canonicalize'?"),
    (["--pipeline", "canonicalize{fold_limit=many}"],
     "option 'fold_limit' of pass 'canonicalize' must be an integer, got 'many'"),
    (["-O7"], "unknown optimization level '7'"),
    (["--print-ir-after", "canonicalise"], "--print-ir-after: unknown pass 'canonicalise'"),
    (["--pass-plugin", "/no/such/plugin.py"], "pass plugin /no/such/plugin.py: no such file"),
    (["--numerics-int-max", "0", "--check-numerics"], "--numerics-int-max must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_1(ir_file, args, message):
    rc, out, err = irlm("opt", ir_file, *args)
    assert rc == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_file_and_missing_argument(tmp_path):
    rc, _, err = irlm("opt", tmp_path / "nope.irlm", "-O1")
    assert rc == 1 and "nope.irlm" in err and err.count("\n") == 1
    rc, _, err = irlm("opt")
    assert rc == 1 and "give an IR file" in err


def test_a_crashing_plugin_pass_is_one_line(ir_file, tmp_path):
    plugin = tmp_path / "crash.py"
    plugin.write_text("from irlm.passes import register_pass\n"
                      "@register_pass('crash-now')\n"
                      "def crash(graph, ctx):\n"
                      "    return {}['missing']\n")
    try:
        rc, out, err = irlm("opt", ir_file, "--pass-plugin", plugin, "--pipeline", "crash-now")
    finally:
        unregister_pass("crash-now")
    assert rc == 1
    assert "pass 'crash-now' (stage 1) failed: KeyError: 'missing' (at " in err
    assert "crash.py:4)" in err and "Traceback" not in err


def test_weights_flag_feeds_params_to_the_numerics_check(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"proj.weight": torch.randn(2, 4)}, str(tmp_path / "w.safetensors"))
    ir = tmp_path / "w.irlm"
    ir.write_text("""graph @w(%x: tensor<3x4xf32>) -> (tensor<3x2xf32>) {
  %w = param "proj.weight" : tensor<2x4xf32>
  %w2 = param "proj.weight" : tensor<2x4xf32>
  %y = core.linear(%x, %w) : tensor<3x2xf32>
  %y2 = core.linear(%x, %w2) : tensor<3x2xf32>
  %s = core.add(%y, %y2) : tensor<3x2xf32>
  return %s
}
""")
    rc, out, err = irlm("opt", ir, "-O1", "--check-numerics")
    assert rc == 1 and "no weight store" in err
    rc, out, err = irlm("opt", ir, "-O1", "--check-numerics", "--weights",
                        tmp_path / "w.safetensors")
    assert rc == 0, err
    assert out.count("param") == 1  # cse merged the two reads of one weight


def test_list_pipelines_shows_each_level_and_its_causal_lm_form():
    from irlm.passes.fusions import FUSION_PASSES
    rc, out, _ = irlm("opt", "--list-pipelines")
    assert rc == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["O0"] == "(no passes)" and lines["O1"] == "canonicalize,cse,dce"
    assert lines["O0-causal-lm"] == "substitute-attention,dce"
    o2 = lines["O2-causal-lm"].split(",")
    assert "substitute-attention" in o2 and all(f in o2 for f in FUSION_PASSES)
    assert o2.index("substitute-attention") < o2.index(FUSION_PASSES[0])


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(ir_file, tmp_path):
    plugin = tmp_path / "crash_debug.py"
    plugin.write_text("from irlm.passes import register_pass\n"
                      "@register_pass('crash-debug')\n"
                      "def crash(graph, ctx):\n"
                      "    return {}['missing']\n")
    try:
        rc, out, err = irlm("opt", ir_file, "--pass-plugin", plugin, "--pipeline", "crash-debug")
        assert rc == 1 and "Traceback" not in err
        assert err.strip().splitlines() == [err.strip()]
        assert err.startswith("irlm: internal error: pass 'crash-debug'")
        assert "re-run with --debug for the traceback" in err
        for argv in (("--debug", "opt"), ("opt", "--debug")):
            rc, out, err = irlm(*argv, ir_file, "--pass-plugin", plugin, "--pipeline",
                                "crash-debug")
            assert rc == 1 and "Traceback" in err and "KeyError: 'missing'" in err
            assert "re-run with --debug" not in err
    finally:
        unregister_pass("crash-debug")
