"""Instrumentation in the pass manager: verify-each, print/dump IR, timing, statistics."""
import io

import pytest

from irlm.text.parser import parse_file, parse_graph
from irlm.passes import (DumpIR, PassFailedError, PassFilter, PassError, PassManager,
                         PassVerificationError, PrintIR, Stats, Timing, register_pass,
                         run_pipeline)
from irlm.passes.registry import unregister_pass
from irlm.text.printer import print_graph

TEXT = """
graph @g(%x: tensor<4x8xf32>) -> (tensor<4x8xf32>) {
  %r0 = core.reshape(%x) {shape = [32]} : tensor<32xf32>
  %r1 = core.reshape(%r0) {shape = [4, 8]} : tensor<4x8xf32>
  %a = core.add(%r1, %r1) : tensor<4x8xf32>
  %dead = core.exp(%a) : tensor<4x8xf32>
  return %a
}
"""


def graph():
    return parse_graph(TEXT, "g.irlm")


@pytest.fixture
def breaking_pass():
    @register_pass("break-types")
    def break_types(graph, ctx):
        """Corrupts an attribute behind the rewriter's back."""
        for op in graph.ops:
            if op.name == "core.reshape":
                op.attrs["shape"] = (8, 4)
                return

    yield "break-types"
    unregister_pass("break-types")


def test_verifier_names_the_pass_and_the_op(breaking_pass):
    with pytest.raises(PassVerificationError) as e:
        run_pipeline(graph(), "cse,break-types")
    msg = str(e.value)
    assert "pass 'break-types' (stage 2) produced invalid IR" in msg
    assert "core.reshape" in msg


def test_verification_can_be_turned_off(breaking_pass):
    run_pipeline(graph(), "break-types", verify_each=False)


def test_invalid_input_is_reported_before_any_pass():
    g = graph()
    next(iter(g.ops)).attrs["shape"] = (3,)
    with pytest.raises(PassVerificationError, match="input graph is invalid.*before any pass"):
        run_pipeline(g, "dce")


def test_a_crashing_pass_is_named_with_where_it_crashed():
    @register_pass("crash")
    def crash(graph, ctx):
        """divides by zero"""
        return 1 // 0

    try:
        with pytest.raises(PassFailedError,
                           match=r"pass 'crash' \(stage 1\) failed: ZeroDivisionError.*"
                                 r"test_pass_instrument.py:\d+"):
            run_pipeline(graph(), "crash")
    finally:
        unregister_pass("crash")


def test_print_ir_before_and_after():
    out = io.StringIO()
    run_pipeline(graph(), "canonicalize,dce",
                 instruments=[PrintIR(PassFilter(["dce"]), PassFilter(["all"]), stream=out)])
    text = out.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("# -----")]
    assert headers == ["# ----- IR after canonicalize (stage 1) -----",
                       "# ----- IR before dce (stage 2) -----",
                       "# ----- IR after dce (stage 2) -----"]
    assert "core.reshape" not in text.split("# ----- IR after canonicalize")[1]


def test_pass_filter_rejects_unknown_names():
    with pytest.raises(PassError, match="--print-ir-after: unknown pass 'canon'.*"
                                        "did you mean 'canonicalize'"):
        PassFilter(["canon"], "--print-ir-after")
    assert "cse" in PassFilter(["dce,cse"]) and "canonicalize" not in PassFilter(["dce,cse"])


def test_dump_dir_has_one_parseable_file_per_stage(tmp_path):
    g = graph()
    run_pipeline(g, "canonicalize,cse,dce", instruments=[DumpIR(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.irlm", "01-canonicalize.irlm", "02-cse.irlm", "03-dce.irlm",
                     "pipeline.txt"]
    assert (tmp_path / "pipeline.txt").read_text() == "canonicalize,cse,dce\n"
    assert parse_file(tmp_path / "00-input.irlm") is not None
    assert print_graph(parse_file(tmp_path / "03-dce.irlm")) == print_graph(g)
    assert "core.exp" in (tmp_path / "00-input.irlm").read_text()
    assert "core.exp" not in (tmp_path / "01-canonicalize.irlm").read_text()


def test_dump_numbering_continues_after_a_stage_offset(tmp_path):
    # the caller wrote 00..03 itself: the passes are stages 04 and 05, no 00-input
    PassManager("cse,dce", [DumpIR(tmp_path)], stage_offset=4).run(graph())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["04-cse.irlm", "05-dce.irlm",
                                                           "pipeline.txt"]


def test_a_failing_pass_leaves_its_ir_in_the_dump(tmp_path, breaking_pass):
    with pytest.raises(PassVerificationError):
        run_pipeline(graph(), "dce,break-types", instruments=[DumpIR(tmp_path)])
    assert (tmp_path / "02-break-types.failed.irlm").exists()


def test_timing_and_stats_tables():
    out = io.StringIO()
    run_pipeline(graph(), "canonicalize,cse,dce",
                 instruments=[Timing(stream=out), Stats(stream=out)])
    text = out.getvalue()
    assert "pass timing" in text and "(verifier)" in text and "total" in text
    assert "pass statistics" in text
    assert "pattern fold_view_chain" in text and "ops erased" in text
    assert "(no changes)" in text  # cse and dce find nothing left to do


def test_report_carries_per_pass_statistics():
    report = run_pipeline(graph(), "canonicalize,dce")
    canon = report.stages[0]
    assert canon.stats.patterns["fold_view_chain"] == 1
    assert canon.stats.counters["ops erased"] >= 3
    assert canon.seconds >= 0 and canon.verify_seconds > 0
